//! The `amqp` action and source against a real RabbitMQ (`REFLEX_TEST_AMQP`, guest on
//! 127.0.0.1 by default): what the action publishes is read back from a queue; what the
//! source consumes is counted in deliveries, and the queues are read back to see that every
//! message was acknowledged or dead-lettered.

use crate::common::{Receiver, Reflex};
use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;
use std::time::Duration;

fn url() -> String {
    std::env::var("REFLEX_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The virtual host of [`url`] (`%2f` by default; the test script's RabbitMQ pass uses one
/// of its own), for URLs that reach the broker another way (a relay).
fn vhost() -> String {
    url().rsplit('/').next().unwrap_or("%2f").to_string()
}

async fn channel() -> (Connection, Channel) {
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (scripts/test.sh starts it)");
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, ch)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn declare_queue(ch: &Channel, name: &str, args: FieldTable) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
}

/// Messages in `queue` now (a passive declare).
async fn depth(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// Takes `n` messages from `queue` (acknowledged), failing after 10 s.
async fn take(ch: &Channel, queue: &str, n: usize) -> Vec<lapin::message::Delivery> {
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            unique("test").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages in {queue}", out.len()))
            .unwrap()
            .unwrap();
        out.push(d);
    }
    out
}

#[tokio::test]
async fn the_amqp_action_publishes_confirmed_persistent_messages() {
    let (_conn, ch) = channel().await;
    let exchange = unique("reflex-x");
    let queue = unique("reflex-q");
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, &queue, FieldTable::default()).await;
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "vro.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    std::env::set_var("REFLEX_IT_AMQP_URL", url());
    std::env::set_var(
        "REFLEX_IT_AMQP_BAD_URL",
        "amqp://guest:Wr0ng-Passw0rd@127.0.0.1:5672/%2f",
    );

    let r = Reflex::start(&format!(
        r#"
sources:
  - {{name: logs, type: webhook, path: /hooks/logs, mapping: {{type: "alert.{{{{ body.kind }}}}", subject: "{{{{ body.vm }}}}", id: "{{{{ body.id }}}}"}}}}
triggers:
  - name: to-orchestrator
    filters: [{{exact: {{type: alert.compromised}}}}]
    action:
      type: amqp
      url: ${{env:REFLEX_IT_AMQP_URL}}
      exchange: {exchange}
      routing_key: "vro.quarantine.{{{{ event.subject }}}}"
      headers: {{x-vm: "{{{{ event.subject }}}}"}}
    delivery: {{max_attempts: 2, backoff: 50ms}}
  - name: unroutable
    filters: [{{exact: {{type: alert.unroutable}}}}]
    action: {{type: amqp, url: "${{env:REFLEX_IT_AMQP_URL}}", exchange: {exchange}, routing_key: "nobody.listens"}}
    delivery: {{max_attempts: 2, backoff: 50ms}}
  - name: bad-password
    filters: [{{exact: {{type: alert.badpw}}}}]
    action: {{type: amqp, url: "${{env:REFLEX_IT_AMQP_BAD_URL}}", exchange: {exchange}}}
    delivery: {{max_attempts: 1}}
"#
    ))
    .await;
    for i in 0..3 {
        let resp = r
            .post_json(
                "/hooks/logs",
                &json!({"kind": "compromised", "vm": format!("vm-{i}"), "id": format!("a-{i}")}),
            )
            .await;
        assert_eq!(resp.status(), 202);
    }
    r.wait_deliveries("trigger=to-orchestrator&state=succeeded", 20, |l| {
        l.len() == 3
    })
    .await;
    let mut got = take(&ch, &queue, 3).await;
    got.sort_by_key(|d| d.routing_key.to_string());
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.routing_key.as_str(), format!("vro.quarantine.vm-{i}"));
        assert_eq!(*d.properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            d.properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/cloudevents+json")
        );
        let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(body["id"], format!("a-{i}"));
        assert_eq!(body["type"], "alert.compromised");
        assert_eq!(body["subject"], format!("vm-{i}"));
        let headers = d.properties.headers().as_ref().unwrap();
        assert_eq!(
            headers.inner().get("x-vm"),
            Some(&AMQPValue::LongString(format!("vm-{i}").as_str().into()))
        );
    }
    assert_eq!(depth(&ch, &queue).await, 0);

    // A message no queue is bound for is not taken: failed attempts, then a dead letter.
    r.post_json(
        "/hooks/logs",
        &json!({"kind": "unroutable", "vm": "vm-x", "id": "u-1"}),
    )
    .await;
    let dead = r
        .wait_deliveries("trigger=unroutable&state=dead", 20, |l| l.len() == 1)
        .await;
    let why = dead[0]["last_error"].as_str().unwrap();
    assert!(
        why.contains("no queue is bound") && why.contains("nobody.listens"),
        "{why}"
    );

    // Refused credentials say which setting to check, and never show the password.
    r.post_json(
        "/hooks/logs",
        &json!({"kind": "badpw", "vm": "vm-y", "id": "p-1"}),
    )
    .await;
    let dead = r
        .wait_deliveries("trigger=bad-password&state=dead", 20, |l| l.len() == 1)
        .await;
    let why = dead[0]["last_error"].as_str().unwrap();
    assert!(why.contains("check the user and password"), "{why}");
    assert!(!why.contains("Wr0ng-Passw0rd"), "{why}");
    r.stop().await;
    let _ = ch
        .queue_delete(
            queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await;
}

#[tokio::test]
async fn the_amqp_source_takes_json_and_cloudevents_and_dead_letters_poison() {
    let (_conn, ch) = channel().await;
    let queue = unique("reflex-in");
    let dead = format!("{queue}.dead");
    declare_queue(&ch, &dead, FieldTable::default()).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dead.as_str().into()),
    );
    declare_queue(&ch, &queue, args).await;
    std::env::set_var("REFLEX_IT_AMQP_URL", url());

    let mut recv = Receiver::start().await;
    let r = Reflex::start(&format!(
        r#"
sources:
  - name: orchestrator
    type: amqp
    url: ${{env:REFLEX_IT_AMQP_URL}}
    queue: {queue}
    prefetch: 8
    mapping: {{type: "vro.{{{{ body.kind }}}}", subject: "{{{{ body.vm }}}}"}}
triggers:
  - name: all
    filters: [{{prefix: {{type: vro.}}}}]
    action: {{type: http, url: "{}"}}
"#,
        recv.url()
    ))
    .await;

    let publish = |body: Vec<u8>, props: BasicProperties| {
        let ch = ch.clone();
        let queue = queue.clone();
        async move {
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props.with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    };
    // Plain JSON, mapped; its message id is the event id, so a repeat deduplicates.
    let json_props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("m-1".into());
    let body = json!({"kind": "restart", "vm": "db-01"})
        .to_string()
        .into_bytes();
    publish(body.clone(), json_props.clone()).await;
    publish(body, json_props).await;
    // A CloudEvent in AMQP binary mode.
    let mut ce = FieldTable::default();
    for (k, v) in [
        ("cloudEvents:specversion", "1.0"),
        ("cloudEvents:id", "ce-bin-1"),
        ("cloudEvents:source", "/vro"),
        ("cloudEvents:type", "vro.binary"),
        ("cloudEvents:subject", "web-02"),
    ] {
        ce.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    publish(
        br#"{"severity": "high"}"#.to_vec(),
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(ce),
    )
    .await;
    // A structured CloudEvent.
    publish(
        json!({"specversion": "1.0", "id": "ce-str-1", "source": "/vro", "type": "vro.structured", "data": {"n": 1}})
            .to_string()
            .into_bytes(),
        BasicProperties::default().with_content_type("application/cloudevents+json".into()),
    )
    .await;
    // Poison: not JSON, and a CloudEvent missing its id.
    publish(b"<not json>".to_vec(), BasicProperties::default()).await;
    publish(
        br#"{"specversion": "1.0", "source": "/vro", "type": "vro.broken"}"#.to_vec(),
        BasicProperties::default().with_content_type("application/cloudevents+json".into()),
    )
    .await;

    let mut seen = Vec::new();
    for _ in 0..3 {
        let m = recv.next(20).await;
        let ev: serde_json::Value = serde_json::from_slice(&m.body).unwrap_or(json!({}));
        seen.push((
            m.headers["ce-type"].to_str().unwrap().to_string(),
            m.headers
                .get("ce-subject")
                .map(|s| s.to_str().unwrap().to_string()),
            ev,
        ));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(seen[0].0, "vro.binary");
    assert_eq!(seen[0].1.as_deref(), Some("web-02"));
    assert_eq!(seen[0].2["severity"], "high");
    assert_eq!(seen[1].0, "vro.restart");
    assert_eq!(seen[1].1.as_deref(), Some("db-01"));
    assert_eq!(seen[2].0, "vro.structured");
    recv.nothing_for(500).await;

    // Every message was acknowledged (the repeat as a duplicate); the poison went to the
    // dead-letter queue, counted by reason.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while depth(&ch, &dead).await < 2 || depth(&ch, &queue).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "queues did not settle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(depth(&ch, &dead).await, 2);
    let metrics = r.metrics().await;
    for reason in ["invalid_json", "invalid_cloudevent"] {
        assert!(
            metrics.contains(&format!(
                "reflex_events_rejected_total{{source=\"orchestrator\",reason=\"{reason}\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
    let events = r.api_get("/api/v1/events?limit=10").await;
    assert_eq!(events["events"].as_array().unwrap().len(), 3, "{events}");
    r.stop().await;
    for q in [&queue, &dead] {
        let _ = ch
            .queue_delete(
                q.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
}

/// A TCP relay in front of RabbitMQ that a test can cut (every connection dropped, the
/// port closed) and restore on the same port: a broker outage for one reflex, without
/// stopping the broker the rest of the suite uses.
struct Relay {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start() -> Relay {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        Relay {
            port,
            task: Some(tokio::spawn(Self::serve(l))),
        }
    }

    async fn serve(l: tokio::net::TcpListener) {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut inbound, _)) = l.accept().await else {
                return;
            };
            conns.spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut up).await;
                }
            });
        }
    }

    fn cut(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every relayed connection.
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    async fn restore(&mut self) {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        self.task = Some(tokio::spawn(Self::serve(l)));
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/{}", self.port, vhost())
    }
}

fn bus_config(url: &str, prefix: &str) -> String {
    std::env::set_var(format!("REFLEX_IT_BUS_{prefix}"), url);
    format!(
        "store: {{path: $DIR/reflex.db}}\nbus: {{type: amqp, url: \"${{env:REFLEX_IT_BUS_{prefix}}}\", exchange: {prefix}.events, prefix: {prefix}}}\n"
    )
}

#[tokio::test]
async fn deliveries_travel_on_rabbitmq_with_retries_dead_letters_and_replay() {
    if crate::common::pg_admin_url().is_none() {
        eprintln!(
            "skipped here: the AMQP bus needs the PostgreSQL store; runs in the PostgreSQL pass"
        );
        return;
    }
    let prefix = unique("rx").replace('-', "_");
    let mut ok = Receiver::start().await;
    let mut flaky = Receiver::start().await;
    flaky.status.store(503, std::sync::atomic::Ordering::SeqCst);
    let r = Reflex::start(&format!(
        r#"{}
sources:
  - {{name: in, type: cloudevents, path: /ce}}
triggers:
  - name: ok
    filters: [{{prefix: {{type: com.example.ok.}}}}]
    action: {{type: http, url: "{}"}}
    delivery: {{concurrency: 8}}
  - name: flaky
    filters: [{{exact: {{type: com.example.flaky}}}}]
    action: {{type: http, url: "{}"}}
    delivery: {{max_attempts: 5, backoff: 100ms}}
  - name: doomed
    filters: [{{exact: {{type: com.example.doomed}}}}]
    action: {{type: http, url: "http://127.0.0.1:9/closed"}}
    delivery: {{max_attempts: 2, backoff: 100ms}}
"#,
        bus_config(&url(), &prefix),
        ok.url(),
        flaky.url()
    ))
    .await;
    for i in 0..50 {
        let resp = crate::common::post_ce(
            &r,
            "/ce",
            crate::common::cloudevent(&format!("ok-{i}"), "com.example.ok.thing", json!({"i": i})),
        )
        .await;
        assert_eq!(resp.status(), 202);
    }
    let mut ids = std::collections::HashSet::new();
    for _ in 0..50 {
        let m = ok.next(20).await;
        assert!(ids.insert(m.id()), "delivered twice: {}", m.id());
    }
    ok.nothing_for(300).await;

    // Retries wait in a delay queue, then succeed.
    crate::common::post_ce(
        &r,
        "/ce",
        crate::common::cloudevent("f-1", "com.example.flaky", json!({})),
    )
    .await;
    flaky.next(10).await;
    flaky.next(10).await;
    flaky.status.store(200, std::sync::atomic::Ordering::SeqCst);
    let done = r
        .wait_deliveries("trigger=flaky&state=succeeded", 20, |l| l.len() == 1)
        .await;
    assert!(done[0]["attempts"].as_u64().unwrap() >= 3, "{}", done[0]);

    // Dead after its attempts, a copy in PREFIX.dead; replayed, it runs again.
    crate::common::post_ce(
        &r,
        "/ce",
        crate::common::cloudevent("d-1", "com.example.doomed", json!({})),
    )
    .await;
    let dead = r
        .wait_deliveries("trigger=doomed&state=dead", 20, |l| l.len() == 1)
        .await;
    assert_eq!(dead[0]["attempts"], 2);
    let (_conn, ch) = channel().await;
    assert_eq!(depth(&ch, &format!("{prefix}.dead")).await, 1);
    let resp = r
        .client
        .post(format!(
            "{}/api/v1/deliveries/{}/replay",
            r.api, dead[0]["id"]
        ))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    r.wait_deliveries("trigger=doomed&state=dead", 20, |l| {
        l.len() == 1 && l[0]["attempts"] == 4
    })
    .await;
    for t in ["ok", "flaky", "doomed"] {
        assert_eq!(depth(&ch, &format!("{prefix}.trigger.{t}")).await, 0, "{t}");
    }
    r.stop().await;
    delete_topology(&prefix, &["ok", "flaky", "doomed"]).await;
}

#[tokio::test]
async fn a_broker_outage_is_a_503_and_nothing_acknowledged_is_lost() {
    if crate::common::pg_admin_url().is_none() {
        eprintln!(
            "skipped here: the AMQP bus needs the PostgreSQL store; runs in the PostgreSQL pass"
        );
        return;
    }
    let prefix = unique("rx").replace('-', "_");
    let mut relay = Relay::start().await;
    let mut recv = Receiver::start().await;
    let r = Reflex::start(&format!(
        r#"{}
sources:
  - {{name: in, type: cloudevents, path: /ce}}
triggers:
  - name: all
    filters: [{{prefix: {{type: com.example.}}}}]
    action: {{type: http, url: "{}"}}
"#,
        bus_config(&relay.url(), &prefix),
        recv.url()
    ))
    .await;
    let post = |id: String| {
        let r = &r;
        async move {
            crate::common::post_ce(
                r,
                "/ce",
                crate::common::cloudevent(&id, "com.example.x", json!({})),
            )
            .await
        }
    };
    let mut accepted = std::collections::HashSet::new();
    for i in 0..10 {
        let resp = post(format!("before-{i}")).await;
        assert_eq!(resp.status(), 202);
        accepted.insert(format!("before-{i}"));
    }
    relay.cut();
    let mut refused = 0;
    for i in 0..10 {
        let resp = post(format!("during-{i}")).await;
        match resp.status().as_u16() {
            202 => {
                accepted.insert(format!("during-{i}"));
            }
            503 => {
                assert_eq!(resp.headers()["retry-after"], "1");
                refused += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(refused > 0, "with the broker gone, events are refused");
    relay.restore().await;
    // Publishers and consumers reconnect; a sender's retry is taken again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let resp = post("after-0".into()).await;
        if resp.status() == 202 {
            accepted.insert("after-0".into());
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no reconnect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut seen = std::collections::HashSet::new();
    while !accepted.is_subset(&seen) {
        let m = recv.next(40).await;
        seen.insert(m.id());
    }
    r.stop().await;
    delete_topology(&prefix, &["all"]).await;
}

/// Deletes what a test's bus declared on the shared broker (`PREFIX.*` of these triggers).
pub(crate) async fn delete_topology(prefix: &str, triggers: &[&str]) {
    let (_conn, ch) = channel().await;
    let mut queues = vec![format!("{prefix}.dead")];
    for t in triggers {
        queues.push(format!("{prefix}.trigger.{t}"));
        for step in reflex::bus::amqp::DELAY_STEPS {
            queues.push(format!("{prefix}.delay.{t}.{step}"));
        }
    }
    for q in queues {
        let _ = ch
            .queue_delete(
                q.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = ch
        .exchange_delete(
            format!("{prefix}.events").as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
}

#[tokio::test]
async fn an_ordered_trigger_keeps_each_keys_order_on_the_bus() {
    if crate::common::pg_admin_url().is_none() {
        eprintln!(
            "skipped here: the AMQP bus needs the PostgreSQL store; runs in the PostgreSQL pass"
        );
        return;
    }
    let prefix = unique("rx").replace('-', "_");
    let mut recv = Receiver::start().await;
    let r = Reflex::start(&format!(
        r#"{}
sources:
  - {{name: in, type: cloudevents, path: /ce}}
triggers:
  - name: ordered
    filters: [{{exact: {{type: com.example.step}}}}]
    action: {{type: http, url: "{}"}}
    delivery: {{concurrency: 8, ordering_key: "{{{{ event.subject }}}}"}}
"#,
        bus_config(&url(), &prefix),
        recv.url()
    ))
    .await;
    for i in 0..20 {
        for key in ["vm-a", "vm-b", "vm-c"] {
            let body = json!({"specversion": "1.0", "id": format!("{key}-{i}"), "source": "/t", "type": "com.example.step", "subject": key, "data": {"i": i}}).to_string();
            let resp = crate::common::post_ce(&r, "/ce", body).await;
            assert_eq!(resp.status(), 202);
        }
    }
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for _ in 0..60 {
        let m = recv.next(30).await;
        let key = m.headers["ce-subject"].to_str().unwrap().to_string();
        let i: i64 = m.id().rsplit('-').next().unwrap().parse().unwrap();
        let prev = last.insert(key.clone(), i).unwrap_or(-1);
        assert_eq!(i, prev + 1, "{key}: {i} after {prev}");
    }
    r.stop().await;
    delete_topology(&prefix, &["ordered"]).await;
}

#[tokio::test]
async fn the_bus_refuses_to_start_with_a_clear_reason() {
    if crate::common::pg_admin_url().is_none() {
        eprintln!(
            "skipped here: the AMQP bus needs the PostgreSQL store; runs in the PostgreSQL pass"
        );
        return;
    }
    let prefix = unique("rx").replace('-', "_");
    let start = |bus: String, ordered: bool| async move {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "store: {}\n{bus}\ntriggers:\n  - name: t\n    filters: [{{exact: {{type: x}}}}]\n    action: {{type: http, url: \"http://127.0.0.1:9/\"}}\n{}",
            crate::common::store_config(dir.path()),
            if ordered { "    delivery: {ordering_key: \"{{ event.subject }}\"}\n" } else { "" }
        );
        let cfg = reflex::config::parse("t.yaml", &yaml).unwrap();
        let compiled = reflex::compile("t.yaml".into(), cfg).unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(reflex::run(
            compiled,
            reflex::Listeners { http, api },
            stop.clone(),
        ));
        // A start that fails returns at once; one that works is stopped after a moment.
        match tokio::time::timeout(Duration::from_secs(3), task).await {
            Ok(r) => r.unwrap().err().map(|e| format!("{e:#}")),
            Err(_) => {
                stop.cancel();
                None
            }
        }
    };
    // Refused credentials name the setting and hide the password.
    let bad = bus_config("amqp://guest:N0t-The-Passw0rd@127.0.0.1:5672/%2f", &prefix);
    let e = start(bad.replace("store: {path: $DIR/reflex.db}\n", ""), false)
        .await
        .expect("refused");
    assert!(
        e.contains("bus.url") && e.contains("check the user and password"),
        "{e}"
    );
    assert!(!e.contains("N0t-The-Passw0rd"), "{e}");
    // A trigger's queue that exists with other arguments: the start says which and why.
    let good = bus_config(&url(), &prefix).replace("store: {path: $DIR/reflex.db}\n", "");
    assert_eq!(start(good.clone(), false).await, None);
    let e = start(good, true).await.expect("refused");
    assert!(
        e.contains("PRECONDITION_FAILED") && e.contains("ordering_key"),
        "{e}"
    );
    delete_topology(&prefix, &["t"]).await;
}

/// `amqps://` with `ca_file`: a TLS relay (an openssl-made certificate for 127.0.0.1) in front
/// of the broker. With the CA the action publishes; without it the certificate is refused
/// (verification is on) and the delivery is dead with the reason.
#[tokio::test]
async fn the_amqp_action_over_tls_verifies_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, acceptor) = crate::common::tls_for_localhost(dir.path());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut up) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                }
            });
        }
    });

    let (_conn, ch) = channel().await;
    let queue = unique("reflex-tls");
    declare_queue(&ch, &queue, FieldTable::default()).await;
    std::env::set_var(
        "REFLEX_IT_AMQPS_URL",
        format!("amqps://guest:guest@127.0.0.1:{port}/{}", vhost()),
    );
    let r = Reflex::start(&format!(
        r#"
sources:
  - {{name: in, type: cloudevents, path: /ce}}
triggers:
  - name: trusted
    filters: [{{exact: {{type: t.trusted}}}}]
    action: {{type: amqp, url: "${{env:REFLEX_IT_AMQPS_URL}}", ca_file: "{}", routing_key: {queue}}}
  - name: untrusted
    filters: [{{exact: {{type: t.untrusted}}}}]
    action: {{type: amqp, url: "${{env:REFLEX_IT_AMQPS_URL}}", routing_key: {queue}}}
    delivery: {{max_attempts: 1}}
"#,
        cert.display()
    ))
    .await;
    for (id, ty) in [("tls-1", "t.trusted"), ("tls-2", "t.untrusted")] {
        let resp =
            crate::common::post_ce(&r, "/ce", crate::common::cloudevent(id, ty, json!({}))).await;
        assert_eq!(resp.status(), 202);
    }
    r.wait_deliveries("trigger=trusted&state=succeeded", 20, |l| l.len() == 1)
        .await;
    let got = take(&ch, &queue, 1).await;
    let body: serde_json::Value = serde_json::from_slice(&got[0].data).unwrap();
    assert_eq!(body["id"], "tls-1");
    let dead = r
        .wait_deliveries("trigger=untrusted&state=dead", 20, |l| l.len() == 1)
        .await;
    let why = dead[0]["last_error"].as_str().unwrap();
    assert!(why.to_lowercase().contains("certificate"), "{why}");
    assert_eq!(depth(&ch, &queue).await, 0);
    r.stop().await;
    let _ = ch
        .queue_delete(
            queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await;
}

#[tokio::test]
async fn a_changed_or_removed_trigger_loses_its_old_bindings() {
    if crate::common::pg_admin_url().is_none() {
        eprintln!(
            "skipped here: the AMQP bus needs the PostgreSQL store; runs in the PostgreSQL pass"
        );
        return;
    }
    let prefix = unique("rb").replace('-', "_");
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let config = |triggers: &str| format!("{}triggers:\n{triggers}", bus_config(&url(), &prefix));
    let action = "action: {type: http, url: \"http://127.0.0.1:9/\"}";
    let r = Reflex::start_in(
        &config(&format!(
            "  - {{name: moved, filters: [{{exact: {{type: b.old}}}}], {action}}}\n  - {{name: dropped, filters: [{{exact: {{type: c.gone}}}}], {action}}}\n"
        )),
        dir.clone(),
    )
    .await;
    r.stop().await;
    // Restarted with `moved` matching another type and `dropped` gone.
    let r = Reflex::start_in(
        &config(&format!(
            "  - {{name: moved, filters: [{{exact: {{type: b.new}}}}], {action}}}\n"
        )),
        dir.clone(),
    )
    .await;
    r.stop().await;
    // With no consumer left, what the exchange routes stays in the queues to count.
    let (_conn, ch) = channel().await;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    for key in ["b.old", "b.new", "c.gone"] {
        ch.basic_publish(
            format!("{prefix}.events").as_str().into(),
            key.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    assert_eq!(
        depth(&ch, &format!("{prefix}.trigger.moved")).await,
        1,
        "only b.new"
    );
    assert_eq!(
        depth(&ch, &format!("{prefix}.trigger.dropped")).await,
        0,
        "unbound"
    );
    delete_topology(&prefix, &["moved", "dropped"]).await;
}
