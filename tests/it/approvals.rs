//! Approvals (guard rail): a change with `approval:` runs only once a person approved the
//! plan it shows, read back from the simulator.

use crate::common::{cloudevent, post_ce, Reflex};
use serde_json::{json, Value};
use std::time::Duration;
use vsphere::sim::Simulator;
use vsphere::vm::VmSelector;

/// Polls the approvals API until one of `trigger` is in `state`.
pub(crate) async fn wait_approval(r: &Reflex, trigger: &str, state: &str, secs: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let v = r.api_get("/api/v1/approvals").await;
        let found = v["approvals"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["trigger"] == trigger && a["state"] == state)
            .cloned();
        if let Some(a) = found {
            return a;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("no {state} approval of {trigger}: {v:#}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Approves (`approve`) or rejects approval `id` through the API.
pub(crate) async fn decide(r: &Reflex, id: &Value, verb: &str, body: Value) -> reqwest::Response {
    r.client
        .post(format!("{}/api/v1/approvals/{id}/{verb}", r.api))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn cpus(c: &vsphere::Client, vm: &str) -> i64 {
    let vm = c.find_vm(&VmSelector::Name(vm.into())).await.unwrap();
    c.vm_facts(&vm).await.unwrap()["cpus"].as_i64().unwrap()
}

/// A workflow step with `approval:` waits with its plan (its dry run against the live VM)
/// and changes nothing; when the VM changed before the approval, the new plan is shown
/// again instead of run; approved again, the step runs and the VM is read back changed,
/// with who approved in the attempt's record. A second change nobody decides on within its
/// timeout ends dead and changes nothing.
#[tokio::test]
async fn a_step_waits_for_approval_and_a_changed_plan_is_shown_again() {
    let sim = Simulator::start();
    let c = crate::vsphere::client(&sim).await;
    std::env::set_var("REFLEX_IT_VC_PASSWORD", "pass");
    let r = Reflex::start(&format!(
        r#"
vcenters:
  vc1: {{url: "{}", username: user, password: "${{env:REFLEX_IT_VC_PASSWORD}}", insecure: true, loop_guard: false}}
sources:
  - {{name: in, type: cloudevents, path: /ce}}
triggers:
  - name: grow
    filters: [{{exact: {{type: vm.grow}}}}]
    action:
      type: workflow
      steps:
        - name: look
          action: {{type: vsphere.get_vm, vcenter: vc1, vm: {{name: "{{{{ event.data.vm }}}}"}}}}
        - name: resize
          when: 'steps.look.output.cpus < 4'
          approval: required
          action: {{type: vsphere.reconfigure, vcenter: vc1, vm: {{name: "{{{{ event.data.vm }}}}"}}, cpus: "4"}}
  - name: shrink
    filters: [{{exact: {{type: vm.shrink}}}}]
    action: {{type: vsphere.reconfigure, vcenter: vc1, vm: {{name: "{{{{ event.data.vm }}}}"}}, cpus: "1"}}
    approval: {{timeout: 1s}}
"#,
        sim.url
    ))
    .await;
    let vm = "DC0_H0_VM0";
    let before = cpus(&c, vm).await;
    assert!(before < 4, "{before}");

    let resp = post_ce(&r, "/ce", cloudevent("g-1", "vm.grow", json!({"vm": vm}))).await;
    assert_eq!(resp.status(), 202);
    let a = wait_approval(&r, "grow", "waiting", 20).await;
    assert_eq!(a["step"], "resize");
    let plan = a["plan"].as_str().unwrap();
    assert!(
        plan.contains("would") && plan.contains(&format!("{before} -> 4")),
        "{a:#}"
    );
    // It waits: retrying, not failed, with the approval in its record; nothing changed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = r
        .wait_deliveries("trigger=grow", 10, |l| l.len() == 1)
        .await;
    assert_eq!(d[0]["state"], "retrying", "{d:#?}");
    assert_eq!(cpus(&c, vm).await, before);

    // The VM changes before anyone decides: the approved plan no longer holds.
    let moref = c.find_vm(&VmSelector::Name(vm.into())).await.unwrap();
    c.reconfigure(&moref, Some(2), None).await.unwrap();
    let resp = decide(
        &r,
        &a["id"],
        "approve",
        json!({"by": "alice", "reason": "CPU ready is high"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let again = loop {
        let a2: Value = r.api_get(&format!("/api/v1/approvals/{}", a["id"])).await;
        if a2["state"] == "waiting" && a2["plan"] != a["plan"] {
            break a2;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        again["plan"].as_str().unwrap().contains("2 -> 4"),
        "{again:#}"
    );
    assert!(
        again["reason"]
            .as_str()
            .unwrap()
            .contains("changed after alice approved"),
        "{again:#}"
    );
    assert_eq!(cpus(&c, vm).await, 2, "nothing runs on a stale approval");
    // Deciding twice is refused.
    let resp = decide(&r, &a["id"], "reject", json!({"by": "bob"})).await;
    assert_eq!(resp.status(), 400, "a rejection needs a reason");

    let resp = decide(&r, &a["id"], "approve", json!({"by": "alice"})).await;
    assert_eq!(resp.status(), 200);
    let done = r
        .wait_deliveries("trigger=grow&state=succeeded", 20, |l| l.len() == 1)
        .await;
    assert_eq!(cpus(&c, vm).await, 4);
    let resp = decide(&r, &a["id"], "approve", json!({"by": "carol"})).await;
    assert_eq!(resp.status(), 409, "decided already");
    let shown = r
        .api_get(&format!("/api/v1/deliveries/{}", done[0]["id"]))
        .await;
    let log = shown["attempt_log"].as_array().unwrap();
    assert_eq!(log[0]["outcome"], "waiting", "{shown:#}");
    let last = log.last().unwrap();
    assert_eq!(last["outcome"], "succeeded", "{shown:#}");
    assert!(
        last["detail"].as_str().unwrap().contains("approved (#")
            && last["detail"].as_str().unwrap().contains("by alice"),
        "{shown:#}"
    );

    // Nobody decides within a second: dead, unchanged.
    let resp = post_ce(&r, "/ce", cloudevent("s-1", "vm.shrink", json!({"vm": vm}))).await;
    assert_eq!(resp.status(), 202);
    let dead = r
        .wait_deliveries("trigger=shrink&state=dead", 20, |l| l.len() == 1)
        .await;
    assert!(
        dead[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("was not approved in time"),
        "{dead:#?}"
    );
    let a = wait_approval(&r, "shrink", "expired", 5).await;
    assert!(a["plan"].as_str().unwrap().contains("4 -> 1"), "{a:#}");
    assert_eq!(cpus(&c, vm).await, 4);
    for decision in ["waiting", "replanned", "approved", "expired"] {
        r.assert_guard_rail("approval", decision).await;
    }
}
