//! Several nodes on one PostgreSQL: real processes with one configuration share the work,
//! each delivery is done by one node, per-key order holds across nodes, and a node killed
//! with SIGKILL leaves its work to the others once its lease runs out.
//!
//! These run in the PostgreSQL pass of the suite (`REFLEX_TEST_STORE=postgres`).

use crate::common::{cloudevent, pg_admin_url, pg_url_for, Receiver};
use crate::e2e_binary::{free_port, wait_ready, BIN};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A reflex process, killed when dropped (a failing test leaves none behind).
struct Node {
    child: Child,
    http: String,
    api: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a node named `name` on the shared store `url`, with `trigger` as its trigger.
async fn node(dir: &Path, name: &str, url: &str, trigger: &str) -> Node {
    let body = format!(
        "sources:\n  - {{name: ce, type: cloudevents, path: /events}}\ntriggers:\n{trigger}"
    );
    node_with(dir, name, url, &body).await
}

/// Starts a node named `name` on the shared store `url` with `body` (sources, triggers…).
async fn node_with(dir: &Path, name: &str, url: &str, body: &str) -> Node {
    let (http, api) = (free_port(), free_port());
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            r#"
http: {{listen: "127.0.0.1:{http}"}}
api: {{listen: "127.0.0.1:{api}"}}
store: {{url: "{url}", lease: 2s, node: {name}, pool_size: 6}}
{body}
"#
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let n = Node {
        child,
        http: format!("http://127.0.0.1:{http}"),
        api: format!("http://127.0.0.1:{api}"),
    };
    wait_ready(&n.api).await;
    n
}

/// Counts what the receiver gets, by CloudEvent id, in arrival order.
fn record(mut rcv: Receiver) -> Arc<Mutex<Vec<(String, String)>>> {
    let got: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let g = got.clone();
    tokio::spawn(async move {
        while let Some(r) = rcv.rx.recv().await {
            let subject = r
                .headers
                .get("ce-subject")
                .map(|s| s.to_str().unwrap().to_string())
                .unwrap_or_default();
            g.lock().unwrap().push((r.id(), subject));
        }
    });
    got
}

async fn post(c: &reqwest::Client, base: &str, body: String) -> Option<reqwest::StatusCode> {
    c.post(format!("{base}/events"))
        .header("content-type", "application/cloudevents+json")
        .body(body)
        .send()
        .await
        .ok()
        .map(|r| r.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_10000_events_and_one_is_killed_halfway() {
    if pg_admin_url().is_none() {
        eprintln!("skipped here: runs in the PostgreSQL pass (REFLEX_TEST_STORE=postgres)");
        return;
    }
    const EVENTS: usize = 10_000;
    let rcv = Receiver::start().await;
    rcv.delay_ms.store(2, Ordering::SeqCst);
    let trigger = format!(
        "  - name: fn\n    action: {{type: http, url: \"{}\"}}\n    delivery: {{concurrency: 16, backoff: 100ms, max_backoff: 1s, max_attempts: 50}}\n",
        rcv.url()
    );
    let got = record(rcv);
    let dir = tempfile::tempdir().unwrap();
    let url = pg_url_for(dir.path());
    let a = node(dir.path(), "node-a", &url, &trigger).await;
    let b = node(dir.path(), "node-b", &url, &trigger).await;
    let (a_http, b_http) = (a.http.clone(), b.http.clone());
    let b_api = b.api.clone();
    let a = Arc::new(Mutex::new(Some(a)));

    // Sixteen senders split the events between the nodes; halfway, node A is killed. A
    // sender whose request to A fails sends the same event to B, as a real sender retries.
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..16 {
        let (next, acked, a, a_http, b_http) = (
            next.clone(),
            acked.clone(),
            a.clone(),
            a_http.clone(),
            b_http.clone(),
        );
        senders.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= EVENTS {
                    return;
                }
                if i == EVENTS / 2 {
                    let killed = a.lock().unwrap().take();
                    drop(killed); // SIGKILL, mid-delivery
                }
                let body = cloudevent(&format!("n-{i}"), "t", json!({}));
                let first = if i % 2 == 0 { &a_http } else { &b_http };
                let mut status = post(&c, first, body.clone()).await;
                if status != Some(reqwest::StatusCode::ACCEPTED) {
                    status = post(&c, &b_http, body).await;
                }
                assert_eq!(status, Some(reqwest::StatusCode::ACCEPTED), "event n-{i}");
                acked.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    assert_eq!(acked.load(Ordering::SeqCst), EVENTS);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let counts = loop {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for (id, _) in got.lock().unwrap().iter() {
            *counts.entry(id.clone()).or_default() += 1;
        }
        if counts.len() == EVENTS {
            break counts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {EVENTS} acknowledged events delivered",
            counts.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "two nodes: {EVENTS} events acknowledged, all delivered; {duplicates} delivered twice (node A's attempts in flight when it was killed)"
    );
    // At least once: only what node A was running when it died may run again, at most
    // its concurrency.
    assert!(
        duplicates <= 16,
        "{duplicates} events delivered more than once"
    );
    // Every node answers for the shared history: nothing is left open.
    let c = reqwest::Client::new();
    for state in ["pending", "running", "retrying", "dead"] {
        let v: serde_json::Value = c
            .get(format!("{b_api}/api/v1/deliveries?state={state}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["deliveries"].as_array().unwrap().len(), 0, "{state}: {v}");
    }
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_across_nodes() {
    if pg_admin_url().is_none() {
        eprintln!("skipped here: runs in the PostgreSQL pass (REFLEX_TEST_STORE=postgres)");
        return;
    }
    let rcv = Receiver::start().await;
    rcv.delay_ms.store(5, Ordering::SeqCst);
    let trigger = format!(
        "  - name: fn\n    action: {{type: http, url: \"{}\"}}\n    delivery: {{concurrency: 8, ordering_key: \"{{{{ event.subject }}}}\"}}\n",
        rcv.url()
    );
    let got = record(rcv);
    let dir = tempfile::tempdir().unwrap();
    let url = pg_url_for(dir.path());
    let a = node(dir.path(), "node-a", &url, &trigger).await;
    let b = node(dir.path(), "node-b", &url, &trigger).await;
    // 200 events over four keys, sent one after the other, alternately to each node: the
    // order of acknowledgement is the order each key must be delivered in.
    let c = reqwest::Client::new();
    for i in 0..200 {
        let body =
            serde_json::json!({"specversion": "1.0", "id": format!("k-{i:03}"), "source": "/test",
            "type": "t", "subject": format!("vm-{}", i % 4)})
            .to_string();
        let to = if i % 2 == 0 { &a.http } else { &b.http };
        assert_eq!(
            post(&c, to, body).await,
            Some(reqwest::StatusCode::ACCEPTED)
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.lock().unwrap().len() < 200 {
        assert!(tokio::time::Instant::now() < deadline, "not all delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = got.lock().unwrap().clone();
    for k in 0..4 {
        let key = format!("vm-{k}");
        let ids: Vec<&str> = got
            .iter()
            .filter(|(_, s)| *s == key)
            .map(|(id, _)| id.as_str())
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "{key} delivered out of order");
        assert_eq!(ids.len(), 50);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vcenter_source_fails_over_to_the_other_node() {
    if pg_admin_url().is_none() {
        eprintln!("skipped here: runs in the PostgreSQL pass (REFLEX_TEST_STORE=postgres)");
        return;
    }
    use vsphere::vm::{PowerOp, VmSelector};
    let sim = vsphere::sim::Simulator::start();
    let c = crate::vsphere::client(&sim).await;
    let rcv = Receiver::start().await;
    std::env::set_var("REFLEX_IT_VC_PASSWORD", "pass");
    let body = format!(
        r#"vcenters:
  vc1: {{url: "{}", username: user, password: "${{env:REFLEX_IT_VC_PASSWORD}}", insecure: true}}
sources:
  - {{name: vc1-events, type: vcenter, vcenter: vc1, poll_interval: 100ms}}
triggers:
  - name: vm-power
    filters: [{{prefix: {{type: com.vmware.vsphere.VmPower}}}}]
    action: {{type: http, url: "{}"}}
"#,
        sim.url,
        rcv.url()
    );
    let got = record(rcv);
    let dir = tempfile::tempdir().unwrap();
    let url = pg_url_for(dir.path());
    let a = node_with(dir.path(), "node-a", &url, &body).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = node_with(dir.path(), "node-b", &url, &body).await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM1".into()))
        .await
        .unwrap();
    let wait_for = |n: usize, secs: u64| {
        let got = got.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
            while got.lock().unwrap().len() < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} of {n} power events delivered",
                    got.lock().unwrap().len()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    c.power(&vm, PowerOp::Off).await.unwrap();
    wait_for(1, 10).await;
    // Node A started first and holds the source; every node answers the same.
    let nodes: serde_json::Value = reqwest::get(format!("{}/api/v1/nodes", b.api))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let holder: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| {
            n["singletons"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == "source:vc1-events")
        })
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(holder, vec!["node-a"], "{nodes}");

    // Node A dies; an event happens while nobody polls; node B takes over from the
    // checkpoint within twice the lease (2 s) and delivers it.
    drop(a);
    let killed = tokio::time::Instant::now();
    c.power(&vm, PowerOp::On).await.unwrap();
    wait_for(2, 20).await;
    let took = killed.elapsed();
    eprintln!("vCenter source failover: the event after SIGKILL was delivered {took:?} later");
    assert!(took < Duration::from_secs(6), "failover took {took:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = got.lock().unwrap().clone();
    let mut ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), got.len(), "an event delivered twice: {got:?}");
    drop(b);
}
