//! What the simulator cannot do by itself: a vCenter task that keeps running past an
//! attempt's timeout, and a lookup that fails once. A small SOAP proxy sits between reflex
//! and the simulator (plain HTTP), forwards everything, and scripts just those answers; the
//! effect is read back from the simulator itself.

use crate::common::Reflex;
use crate::vsphere::client;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::{Arc, Mutex};
use vsphere::sim::Simulator;
use vsphere::vm::{PowerOp, VmSelector};

/// The task id the proxy answers for a held call.
const HELD: &str = "task-held";

#[derive(Default)]
struct Script {
    /// Calls seen, by method name.
    seen: Vec<String>,
    /// Hold the next call of this method: answer task [`HELD`], running, instead.
    hold: Option<String>,
    /// The held call's request, forwarded when the test releases it.
    held: Option<(HeaderMap, Bytes)>,
    /// The held task's state as the proxy reports it.
    held_state: Option<&'static str>,
    /// Answer the next call of this method with a `SystemError` fault.
    fail: Option<String>,
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    http: reqwest::Client,
    script: Arc<Mutex<Script>>,
}

fn method_of(body: &str) -> String {
    let Some(i) = body.find("<soapenv:Body>") else {
        return String::new();
    };
    let rest = &body[i + "<soapenv:Body>".len()..];
    let rest = rest.trim_start().trim_start_matches('<');
    rest.split(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .next()
        .unwrap_or("")
        .to_string()
}

fn envelope(body: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema"><soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"#
    )
}

fn xml(status: StatusCode, body: String) -> Response {
    (status, [("content-type", "text/xml; charset=utf-8")], body).into_response()
}

fn fault(name: &str, message: &str) -> Response {
    xml(
        StatusCode::INTERNAL_SERVER_ERROR,
        envelope(&format!(
            r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>{message}</faultstring><detail><{name}Fault xmlns="urn:vim25" xsi:type="{name}"></{name}Fault></detail></soapenv:Fault>"#
        )),
    )
}

async fn forward(p: &Proxy, headers: &HeaderMap, body: Bytes) -> Response {
    let mut req = p.http.post(&p.upstream).body(body);
    for (k, v) in headers {
        if k != "host" && k != "content-length" {
            req = req.header(k, v);
        }
    }
    let resp = req.send().await.expect("the simulator answers");
    let status = resp.status();
    let mut out = HeaderMap::new();
    for (k, v) in resp.headers() {
        if k != "content-length" && k != "transfer-encoding" {
            out.insert(k, v.clone());
        }
    }
    let bytes = resp.bytes().await.unwrap();
    (status, out, bytes).into_response()
}

async fn handle(State(p): State<Proxy>, headers: HeaderMap, body: Bytes) -> Response {
    let text = String::from_utf8_lossy(&body).to_string();
    let method = method_of(&text);
    let scripted = {
        let mut s = p.script.lock().unwrap();
        s.seen.push(method.clone());
        if s.fail.as_deref() == Some(method.as_str()) {
            s.fail = None;
            Some(fault("SystemError", "scripted failure of a lookup"))
        } else if s.hold.as_deref() == Some(method.as_str()) {
            s.hold = None;
            s.held = Some((headers.clone(), body.clone()));
            s.held_state = Some("running");
            Some(xml(
                StatusCode::OK,
                envelope(&format!(
                    r#"<{method}Response xmlns="urn:vim25"><returnval type="Task">{HELD}</returnval></{method}Response>"#
                )),
            ))
        } else if text.contains(HELD) {
            match (method.as_str(), s.held_state) {
                ("RetrievePropertiesEx", Some(state)) => Some(xml(
                    StatusCode::OK,
                    envelope(&format!(
                        r#"<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="Task">{HELD}</obj><propSet><name>info.state</name><val xsi:type="TaskInfoState">{state}</val></propSet></objects></returnval></RetrievePropertiesExResponse>"#
                    )),
                )),
                // No watch on the made-up task: the client falls back to polling it.
                _ => Some(fault(
                    "ManagedObjectNotFound",
                    "the held task cannot be watched",
                )),
            }
        } else {
            None
        }
    };
    match scripted {
        Some(r) => r,
        None => forward(&p, &headers, body).await,
    }
}

impl Proxy {
    /// Serves on a free loopback port in front of `sim` (plain HTTP); returns its `/sdk` URL.
    async fn start(sim: &Simulator) -> (Proxy, String) {
        let p = Proxy {
            upstream: sim.url.clone(),
            http: reqwest::Client::new(),
            script: Arc::default(),
        };
        let app = axum::Router::new()
            .fallback(axum::routing::post(handle))
            .with_state(p.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/sdk", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        (p, url)
    }

    fn count(&self, method: &str) -> usize {
        let s = self.script.lock().unwrap();
        s.seen.iter().filter(|m| *m == method).count()
    }

    /// Lets the held call run in the simulator, then reports its task finished.
    async fn release(&self) {
        let (headers, body) = self
            .script
            .lock()
            .unwrap()
            .held
            .take()
            .expect("a held call");
        let resp = forward(self, &headers, body).await;
        assert_eq!(resp.status(), 200, "the held call ran in the simulator");
        self.script.lock().unwrap().held_state = Some("success");
    }
}

fn vcenter(url: &str) -> String {
    std::env::set_var("REFLEX_IT_VC_PASSWORD", "pass");
    format!(
        "vcenters:\n  vc1:\n    url: {url}\n    username: user\n    password: ${{env:REFLEX_IT_VC_PASSWORD}}\n    insecure: true\n"
    )
}

async fn attempt_log(r: &Reflex, id: &serde_json::Value) -> Vec<serde_json::Value> {
    r.api_get(&format!("/api/v1/deliveries/{id}")).await["attempt_log"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// An attempt times out while the power-on it started still runs in vCenter: the attempt's
/// record names the task, the next attempts wait for that task instead of powering on again,
/// and once it ends the delivery succeeds with one power-on in all.
#[tokio::test]
async fn a_task_left_running_is_awaited_not_started_again() {
    let sim = Simulator::start_with(&["-plain"]);
    let c = client(&sim).await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM1".into()))
        .await
        .unwrap();
    c.power(&vm, PowerOp::Off).await.unwrap();
    let (proxy, url) = Proxy::start(&sim).await;
    proxy.script.lock().unwrap().hold = Some("PowerOnVM_Task".into());

    let r = Reflex::start(&format!(
        r#"{}
sources:
  - {{name: ops, type: webhook, path: /hooks/ops, mapping: {{type: ops.start, subject: "{{{{ body.vm }}}}"}}}}
triggers:
  - name: start
    filters: [{{exact: {{type: ops.start}}}}]
    action: {{type: vsphere.power, vcenter: vc1, op: "on", vm: {{name: "{{{{ event.subject }}}}"}}}}
    delivery: {{timeout: 1s, max_attempts: 10, backoff: 100ms}}
"#,
        vcenter(&url)
    ))
    .await;
    let resp = r
        .post_json("/hooks/ops", &json!({"vm": "DC0_H0_VM1"}))
        .await;
    assert_eq!(resp.status(), 202);

    // Two attempts time out: the first while its own task runs, the second while it waits.
    let d = r
        .wait_deliveries("trigger=start", 20, |l| {
            l.len() == 1 && l[0]["attempts"].as_u64().unwrap_or(0) >= 2
        })
        .await;
    let log = attempt_log(&r, &d[0]["id"]).await;
    for a in &log[..2] {
        assert_eq!(a["outcome"], "timeout", "{a}");
        assert!(
            a["detail"]
                .as_str()
                .unwrap()
                .contains("[vCenter task task-held still running: the next attempt waits for it]"),
            "{a}"
        );
    }
    assert_eq!(
        proxy.count("PowerOnVM_Task"),
        1,
        "one power-on while it runs"
    );
    assert_eq!(c.power_state(&vm).await.unwrap(), "poweredOff");

    proxy.release().await;
    let ok = r
        .wait_deliveries("state=succeeded", 20, |l| l.len() == 1)
        .await;
    let log = attempt_log(&r, &ok[0]["id"]).await;
    let last = log.last().unwrap();
    assert_eq!(last["outcome"], "succeeded", "{last}");
    assert!(
        last["detail"].as_str().unwrap().contains(
            "waited for task task-held, left running by an earlier attempt: it succeeded"
        ),
        "{last}"
    );
    // The held call is the one power-on the simulator saw; no attempt issued another.
    assert_eq!(proxy.count("PowerOnVM_Task"), 1);
    assert_eq!(c.power_state(&vm).await.unwrap(), "poweredOn");
    r.stop().await;
}

/// `clone_vm` clones only on a definite "no VM of that name": when the existence check
/// itself fails, the attempt fails (and is retried) without cloning; the retry clones once.
#[tokio::test]
async fn clone_vm_does_not_clone_when_the_existence_check_fails() {
    let sim = Simulator::start_with(&["-plain"]);
    let c = client(&sim).await;
    let (proxy, url) = Proxy::start(&sim).await;

    let r = Reflex::start(&format!(
        r#"{}
sources:
  - {{name: ops, type: webhook, path: /hooks/ops, mapping: {{type: ops.clone, subject: "{{{{ body.name }}}}"}}}}
triggers:
  - name: clone
    filters: [{{exact: {{type: ops.clone}}}}]
    action: {{type: vsphere.clone_vm, vcenter: vc1, vm: {{name: DC0_H0_VM0}}, name: "{{{{ event.subject }}}}"}}
    delivery: {{max_attempts: 5, backoff: 100ms}}
"#,
        vcenter(&url)
    ))
    .await;
    // Warm the session, so that the scripted failure hits the existence check itself.
    r.client
        .get(format!("{}/readyz", r.api))
        .send()
        .await
        .unwrap();
    proxy.script.lock().unwrap().fail = Some("CreateContainerView".into());
    let resp = r
        .post_json("/hooks/ops", &json!({"name": "clone-once"}))
        .await;
    assert_eq!(resp.status(), 202);
    let ok = r
        .wait_deliveries("state=succeeded", 30, |l| l.len() == 1)
        .await;
    let log = attempt_log(&r, &ok[0]["id"]).await;
    assert_eq!(log.len(), 2, "{log:#?}");
    assert_eq!(log[0]["outcome"], "failed");
    assert!(
        log[0]["detail"]
            .as_str()
            .unwrap()
            .contains("scripted failure of a lookup"),
        "{}",
        log[0]
    );
    assert_eq!(proxy.count("CloneVM_Task"), 1, "cloned once, by the retry");
    c.find_vm(&VmSelector::Name("clone-once".into()))
        .await
        .expect("the clone exists");
    r.stop().await;
}
