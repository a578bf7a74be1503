//! `type: workflow` over real HTTP: step outputs feed later templates, `when` skips a step,
//! a retried delivery resumes after the step that succeeded (it is not run again), and a
//! step that fails for good runs `on_failure` with its error.

use crate::common::{Receiver, Reflex};
use serde_json::json;
use std::sync::atomic::Ordering;

#[tokio::test]
async fn a_workflow_passes_outputs_on_and_resumes_after_the_steps_done() {
    let mut token = Receiver::start_with_reply(Some((
        vec![("content-type", "application/json".into())],
        json!({"token": "t0k3n-from-auth"}).to_string(),
    )))
    .await;
    let mut mark = Receiver::start().await;
    mark.status.store(503, Ordering::SeqCst);
    let mut notify = Receiver::start().await;
    let r = Reflex::start(&format!(
        r#"
sources:
  - {{name: in, type: cloudevents, path: /ce}}
triggers:
  - name: maintenance
    filters: [{{prefix: {{type: host.}}}}]
    action:
      type: workflow
      steps:
        - name: token
          action: {{type: http_request, url: "{token}"}}
        - name: low_only
          when: "event.data.severity == 'low'"
          action: {{type: http_request, url: "{notify}"}}
        - name: mark
          action:
            type: http_request
            url: "{mark}"
            headers: {{authorization: "Bearer {{{{ steps.token.output.token }}}}"}}
            body: '{{"host": "{{{{ event.subject }}}}", "low_only": "{{{{ steps.low_only.status }}}}"}}'
      on_failure:
        - name: tell
          action: {{type: http_request, url: "{notify}", body: "{{{{ steps.mark.error }}}}"}}
    delivery: {{max_attempts: 5, backoff: 300ms}}
"#,
        token = token.url(),
        mark = mark.url(),
        notify = notify.url(),
    ))
    .await;
    let post = |id: &str, ty: &str, sev: &str| {
        let body = json!({"specversion": "1.0", "id": id, "source": "/vrops", "type": ty, "subject": "esx-01", "data": {"severity": sev}}).to_string();
        let r = &r;
        async move { crate::common::post_ce(r, "/ce", body).await }
    };
    assert_eq!(post("w-1", "host.maintenance", "high").await.status(), 202);
    token.next(10).await;
    let first = mark.next(10).await;
    assert_eq!(first.headers["authorization"], "Bearer t0k3n-from-auth");
    mark.status.store(200, Ordering::SeqCst);
    let again = mark.next(10).await;
    let body: serde_json::Value = serde_json::from_slice(&again.body).unwrap();
    assert_eq!(body, json!({"host": "esx-01", "low_only": "skipped"}));
    let ok = r
        .wait_deliveries("trigger=maintenance&state=succeeded", 20, |l| l.len() == 1)
        .await;
    // The token step ran once: the retry resumed after it.
    token.nothing_for(300).await;
    notify.nothing_for(0).await;
    let d = r
        .api_get(&format!("/api/v1/deliveries/{}", ok[0]["id"]))
        .await;
    let log = d["attempt_log"].as_array().unwrap();
    let first = log[0]["detail"].as_str().unwrap();
    assert!(first.starts_with("step `mark` failed: "), "{first}");
    assert!(first.contains("token: POST"), "{first}");
    let last = log.last().unwrap()["detail"].as_str().unwrap();
    assert!(
        last.contains("token: succeeded in an earlier attempt"),
        "{last}"
    );
    assert!(last.contains("low_only: skipped"), "{last}");
    assert!(last.contains("mark: POST"), "{last}");

    // A step that fails for good (HTTP 400, permanent) runs on_failure with its error, once.
    mark.status.store(400, Ordering::SeqCst);
    assert_eq!(post("w-2", "host.maintenance", "high").await.status(), 202);
    let told = notify.next(10).await;
    let told = String::from_utf8_lossy(&told.body).to_string();
    assert!(told.contains("HTTP 400"), "{told}");
    let dead = r
        .wait_deliveries("trigger=maintenance&state=dead", 20, |l| l.len() == 1)
        .await;
    assert_eq!(dead[0]["attempts"], 1);
    assert!(
        dead[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("on_failure tell: POST"),
        "{}",
        dead[0]
    );
    notify.nothing_for(300).await;
    r.stop().await;
}

/// A stand-in for the vRealize Operations suite API of seed 003: a token for the right
/// user and password, a host's resource id by name, and its maintenance mark (the first
/// mark answers 503 once, as a busy server would).
#[derive(Default)]
struct Vrops {
    tokens_issued: usize,
    lookups: usize,
    marks: usize,
    maintained: std::collections::HashSet<String>,
}

const VROPS_TOKEN: &str = "vrops-T0KEN-8d1f5e";

async fn vrops() -> (std::sync::Arc<std::sync::Mutex<Vrops>>, String) {
    use axum::extract::{Path, Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post, put};
    use axum::Json;
    type S = std::sync::Arc<std::sync::Mutex<Vrops>>;
    fn authorized(h: &HeaderMap) -> bool {
        h.get("authorization").and_then(|v| v.to_str().ok())
            == Some(&format!("vRealizeOpsToken {VROPS_TOKEN}"))
    }
    let state: S = Default::default();
    let app = axum::Router::new()
        .route(
            "/suite-api/api/auth/token/acquire",
            post(
                |State(s): State<S>, Json(b): Json<serde_json::Value>| async move {
                    if b["username"] != "admin" || b["password"] != "vr0ps-Passw0rd" {
                        return (
                            StatusCode::UNAUTHORIZED,
                            Json(json!({"message": "bad credentials"})),
                        );
                    }
                    s.lock().unwrap().tokens_issued += 1;
                    (
                        StatusCode::OK,
                        Json(json!({"token": VROPS_TOKEN, "validity": 0})),
                    )
                },
            ),
        )
        .route(
            "/suite-api/api/adapterkinds/VMWARE/resourcekinds/HostSystem/resources",
            get(
                |State(s): State<S>,
                 h: HeaderMap,
                 Query(q): Query<std::collections::HashMap<String, String>>| async move {
                    if !authorized(&h) {
                        return (StatusCode::UNAUTHORIZED, Json(json!({})));
                    }
                    s.lock().unwrap().lookups += 1;
                    let name = q.get("name").cloned().unwrap_or_default();
                    (
                        StatusCode::OK,
                        Json(json!({"resourceList": [{"identifier": format!("res-{name}")}]})),
                    )
                },
            ),
        )
        .route(
            "/suite-api/api/resources/{id}/maintained",
            put(
                |State(s): State<S>, h: HeaderMap, Path(id): Path<String>| async move {
                    if !authorized(&h) {
                        return StatusCode::UNAUTHORIZED;
                    }
                    let mut s = s.lock().unwrap();
                    s.marks += 1;
                    if s.marks == 1 {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    s.maintained.insert(id);
                    StatusCode::OK
                },
            )
            .delete(
                |State(s): State<S>, h: HeaderMap, Path(id): Path<String>| async move {
                    if !authorized(&h) {
                        return StatusCode::UNAUTHORIZED;
                    }
                    s.lock().unwrap().maintained.remove(&id);
                    StatusCode::OK
                },
            ),
        )
        .with_state(state.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (state, format!("http://{addr}"))
}

/// Seed 003 end to end: a host entering maintenance in vCenter (its event read by the
/// vcenter source) acquires a vROps token, finds the host's resource and marks it; leaving
/// maintenance unmarks it. The first mark fails once: the retry runs the token step again
/// (it is `sensitive`) but not the lookup. The token appears in no record or API answer.
#[tokio::test]
async fn scenario_maintenance_sync_marks_and_unmarks_the_host_in_vrops() {
    use vsphere::Node;
    let sim = vsphere::sim::Simulator::start();
    let c = crate::vsphere::client(&sim).await;
    let (vrops_state, vrops_url) = vrops().await;
    std::env::set_var("REFLEX_IT_VC_PASSWORD", "pass");
    std::env::set_var("REFLEX_IT_VROPS_PASSWORD", "vr0ps-Passw0rd");
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/maintenance-sync.yaml"
    ))
    .unwrap()
    .replace("https://vcenter.example.com/sdk", &sim.url)
    .replace("${env:VCENTER_USER}", "user")
    .replace("${env:VCENTER_PASSWORD}", "${env:REFLEX_IT_VC_PASSWORD}")
    // The tests' own client shares reflex's user: its changes must count.
    .replace("# insecure: true", "insecure: true\n    loop_guard: false")
    .replace("${env:VROPS_PASSWORD}", "${env:REFLEX_IT_VROPS_PASSWORD}")
    .replace("https://vrops.example.com", &vrops_url)
    .replace("poll_interval: 1s", "poll_interval: 100ms");
    let r = Reflex::start(&yaml).await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;

    let host = c.find_by_name("HostSystem", "DC0_H0").await.unwrap();
    let post = |class: &str, message: &str| {
        Node::new("event")
            .typed(class)
            .with(Node::text("key", "0"))
            .with(Node::text("chainId", "0"))
            .with(Node::text("createdTime", "2026-01-01T00:00:00Z"))
            .with(Node::text("userName", ""))
            .with(
                Node::new("host")
                    .with(Node::text("name", "DC0_H0"))
                    .with(host.node("host")),
            )
            .with(Node::text("fullFormattedMessage", message))
    };
    c.post_event(post(
        "EnteredMaintenanceModeEvent",
        "Host DC0_H0 in DC0 has entered maintenance mode",
    ))
    .await
    .unwrap();
    r.wait_deliveries("trigger=maintenance-sync&state=succeeded", 20, |l| {
        l.len() == 1
    })
    .await;
    {
        let s = vrops_state.lock().unwrap();
        assert!(s.maintained.contains("res-DC0_H0"));
        assert_eq!(
            (s.tokens_issued, s.lookups, s.marks),
            (2, 1, 2),
            "token again, lookup resumed"
        );
    }
    c.post_event(post(
        "ExitMaintenanceModeEvent",
        "Host DC0_H0 in DC0 has exited maintenance mode",
    ))
    .await
    .unwrap();
    r.wait_deliveries("trigger=maintenance-sync&state=succeeded", 20, |l| {
        l.len() == 2
    })
    .await;
    assert!(vrops_state.lock().unwrap().maintained.is_empty());

    // The token is in no record and no answer.
    let list = r.api_get("/api/v1/deliveries?limit=100").await;
    let mut answers = list.to_string();
    for d in list["deliveries"].as_array().unwrap() {
        answers.push_str(
            &r.api_get(&format!("/api/v1/deliveries/{}", d["id"]))
                .await
                .to_string(),
        );
    }
    answers.push_str(&r.api_get("/api/v1/events?limit=100").await.to_string());
    assert!(
        answers.contains("step `mark` failed"),
        "the failed attempt is recorded"
    );
    assert!(
        !answers.contains(VROPS_TOKEN),
        "the token leaked: {answers}"
    );
    assert!(!answers.contains("vr0ps-Passw0rd"));
    r.stop().await;
}

pub(crate) fn example_on_simulator(file: &str, sim: &vsphere::sim::Simulator) -> String {
    std::env::set_var("REFLEX_IT_VC_PASSWORD", "pass");
    std::fs::read_to_string(format!("{}/examples/{file}", env!("CARGO_MANIFEST_DIR")))
        .unwrap()
        .replace("https://vcenter.example.com/sdk", &sim.url)
        .replace("${env:VCENTER_USER}", "user")
        .replace("${env:VCENTER_PASSWORD}", "${env:REFLEX_IT_VC_PASSWORD}")
        // The tests' own client shares reflex's user: its changes must count.
        .replace("# insecure: true", "insecure: true\n    loop_guard: false")
        .replace("poll_interval: 1s", "poll_interval: 100ms")
}

/// Seed 004's vertical scaling, as examples/vertical-scaling.yaml writes it: a red CPU
/// alarm tags the VM with its next size, read back through the REST tagging API; the same
/// alarm again changes nothing; a power-off reconfigures the VM to that size (read back)
/// and removes the tags; the next power-off finds no tags and does nothing.
#[tokio::test]
async fn scenario_vertical_scaling_tags_on_alarm_and_resizes_at_power_off() {
    use vsphere::vm::{PowerOp, VmSelector};
    let sim = vsphere::sim::Simulator::start();
    let c = crate::vsphere::client(&sim).await;
    let r = Reflex::start(&example_on_simulator("vertical-scaling.yaml", &sim)).await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    let before = c.vm_facts(&vm).await.unwrap();
    assert_eq!(before["name"], "DC0_H0_VM0");
    assert_eq!(before["power_state"], "poweredOn");
    assert_eq!(before["host"], "DC0_H0");
    assert!(before["folder"].is_string(), "{before}");
    assert!(
        !before["datastores"].as_array().unwrap().is_empty(),
        "{before}"
    );
    assert_eq!(before["tags"], json!({}), "{before}");
    let (cpus, mem) = (
        before["cpus"].as_i64().unwrap(),
        before["memory_mb"].as_i64().unwrap(),
    );
    let (next_cpus, next_mem) = ((cpus + 1).min(4), (mem * 2).min(8192));
    let alarm = || {
        vsphere::events::alarm_status_changed(&vm, "DC0_H0_VM0", "VM CPU Usage", "yellow", "red")
    };

    c.post_event(alarm()).await.unwrap();
    r.wait_deliveries("trigger=plan-next-size&state=succeeded", 20, |l| {
        l.len() == 1
    })
    .await;
    assert_eq!(
        c.tag_names(&vm, "reflex-cpus").await.unwrap(),
        vec![next_cpus.to_string()]
    );
    assert_eq!(
        c.tag_names(&vm, "reflex-memory").await.unwrap(),
        vec![next_mem.to_string()]
    );

    // The same alarm again: the VM carries its next size already; nothing is done.
    c.post_event(alarm()).await.unwrap();
    let done = r
        .wait_deliveries("trigger=plan-next-size&state=succeeded", 20, |l| {
            l.len() == 2
        })
        .await;
    let d = r
        .api_get(&format!("/api/v1/deliveries/{}", done[0]["id"]))
        .await;
    let detail = d["attempt_log"][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("cpus: skipped") && detail.contains("memory: skipped"),
        "{detail}"
    );
    assert_eq!(
        c.tag_names(&vm, "reflex-cpus").await.unwrap(),
        vec![next_cpus.to_string()]
    );

    // Power-off: resized to the planned size, tags removed.
    c.power(&vm, PowerOp::Off).await.unwrap();
    let resized = r
        .wait_deliveries("trigger=resize-at-power-off&state=succeeded", 20, |l| {
            l.len() == 1
        })
        .await;
    let after = c.vm_facts(&vm).await.unwrap();
    assert_eq!(
        (after["cpus"].as_i64(), after["memory_mb"].as_i64()),
        (Some(next_cpus), Some(next_mem))
    );
    // (The simulator keeps no config.changeVersion, so the guard it carries cannot be
    // shown here; the facts carry it from a real vCenter.)
    assert!(c.tag_names(&vm, "reflex-cpus").await.unwrap().is_empty());
    assert!(c.tag_names(&vm, "reflex-memory").await.unwrap().is_empty());
    let d = r
        .api_get(&format!("/api/v1/deliveries/{}", resized[0]["id"]))
        .await;
    let detail = d["attempt_log"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("resize: changed"), "{detail}");

    // The next power-off finds no planned size: nothing is reconfigured.
    c.power(&vm, PowerOp::On).await.unwrap();
    c.power(&vm, PowerOp::Off).await.unwrap();
    let all = r
        .wait_deliveries("trigger=resize-at-power-off&state=succeeded", 20, |l| {
            l.len() == 2
        })
        .await;
    let d = r
        .api_get(&format!("/api/v1/deliveries/{}", all[0]["id"]))
        .await;
    let detail = d["attempt_log"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("resize: skipped"), "{detail}");
    assert_eq!(
        c.vm_facts(&vm).await.unwrap()["cpus"].as_i64(),
        Some(next_cpus)
    );
    r.stop().await;
}

/// `vsphere.get_host` reads a host's facts for later steps: its cluster, state, cores and
/// VMs reach a template and a `when`; the host is put in maintenance mode only because
/// the facts said it is in cluster `DC0_C0` and not in maintenance yet (read back), and a
/// second event, now that it is, skips that step.
#[tokio::test]
async fn get_host_facts_drive_a_later_step() {
    let sim = vsphere::sim::Simulator::start();
    let c = crate::vsphere::client(&sim).await;
    let mut rx = Receiver::start().await;
    std::env::set_var("REFLEX_IT_VC_PASSWORD", "pass");
    let r = Reflex::start(&format!(
        r#"
vcenters:
  vc1: {{url: "{}", username: user, password: "${{env:REFLEX_IT_VC_PASSWORD}}", insecure: true, loop_guard: false}}
sources:
  - {{name: in, type: cloudevents, path: /ce}}
triggers:
  - name: drain
    filters: [{{exact: {{type: host.drain}}}}]
    action:
      type: workflow
      steps:
        - name: look
          action: {{type: vsphere.get_host, vcenter: vc1, host: "{{{{ event.subject }}}}"}}
        - name: tell
          action: {{type: http_request, url: "{}", body: "{{{{ steps.look.output | tojson }}}}"}}
        - name: enter
          when: 'steps.look.output.cluster == "DC0_C0" && !steps.look.output.in_maintenance'
          action: {{type: vsphere.host_maintenance, vcenter: vc1, host: "{{{{ event.subject }}}}", mode: enter}}
"#,
        sim.url,
        rx.url()
    ))
    .await;
    let post = |id: &str| {
        crate::common::post_ce(
            &r,
            "/ce",
            json!({"specversion": "1.0", "id": id, "source": "/ops", "type": "host.drain", "subject": "DC0_C0_H1"}).to_string(),
        )
    };
    post("d-1").await;
    let m = rx.next(30).await;
    let facts: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    assert_eq!(facts["name"], "DC0_C0_H1", "{facts:#}");
    assert_eq!(facts["cluster"], "DC0_C0", "{facts:#}");
    assert_eq!(facts["in_maintenance"], false, "{facts:#}");
    assert_eq!(facts["connection_state"], "connected", "{facts:#}");
    assert!(facts["cpu_cores"].as_i64().unwrap() > 0, "{facts:#}");
    assert!(facts["vms"].is_array(), "{facts:#}");
    r.wait_deliveries("trigger=drain&state=succeeded", 30, |l| l.len() == 1)
        .await;
    let h1 = c.find_by_name("HostSystem", "DC0_C0_H1").await.unwrap();
    let in_maintenance = || async {
        c.property(&h1, "runtime.inMaintenanceMode")
            .await
            .unwrap()
            .unwrap()
            .text
    };
    assert_eq!(in_maintenance().await, "true");
    post("d-2").await;
    let m = rx.next(30).await;
    let facts: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    assert_eq!(facts["in_maintenance"], true, "{facts:#}");
    let done = r
        .wait_deliveries("trigger=drain&state=succeeded", 30, |l| l.len() == 2)
        .await;
    let second = r
        .api_get(&format!("/api/v1/deliveries/{}", done[0]["id"]))
        .await;
    assert!(
        second.to_string().contains("enter") && second.to_string().contains("skipped"),
        "the second run skipped the step: {second:#}"
    );
    r.stop().await;
}
