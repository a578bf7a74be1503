//! Scenarios run from their example files as written (the vCenter's address and
//! credentials swapped for the simulator's), checked by reading the simulator back.

use crate::common::Reflex;
use crate::workflow::example_on_simulator;
use serde_json::{json, Value};
use vsphere::sim::Simulator;
use vsphere::vm::VmSelector;

/// Seed 004's storage relief (examples/storage-relief.yaml): a yellow alarm makes the
/// shadow record the datastore it would choose and nothing moves; a red one moves the VM to
/// that datastore, the allowed one with the most free space; a second red alarm within the
/// throttle window does nothing.
#[tokio::test]
async fn scenario_storage_relief_moves_the_vm_to_the_allowed_datastore_with_most_room() {
    let sim = Simulator::start_with(&["-ds", "3"]);
    let c = crate::vsphere::client(&sim).await;
    let free = |name: &'static str| {
        let c = &c;
        async move {
            let ds = c.find_by_name("Datastore", name).await.unwrap();
            c.property(&ds, "summary.freeSpace")
                .await
                .unwrap()
                .unwrap()
                .text
                .parse::<i64>()
                .unwrap()
        }
    };
    let expected = if free("LocalDS_1").await >= free("LocalDS_2").await {
        "LocalDS_1"
    } else {
        "LocalDS_2"
    };
    let yaml = example_on_simulator("storage-relief.yaml", &sim)
        .replace("gold-ds-01", "LocalDS_1")
        .replace("gold-ds-02", "LocalDS_2");
    let r = Reflex::start(&yaml).await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    let datastores = || {
        let (vm, c) = (vm.clone(), &c);
        async move { c.vm_facts(&vm).await.unwrap()["datastores"].clone() }
    };
    let before = datastores().await;
    assert_eq!(before, json!(["LocalDS_0"]));
    let alarm = |to: &str| {
        vsphere::events::alarm_status_changed(&vm, "DC0_H0_VM0", "VM Storage Usage", "green", to)
    };

    c.post_event(alarm("yellow")).await.unwrap();
    let plan = r
        .wait_deliveries("trigger=storage-relief-plan&state=succeeded", 20, |l| {
            l.len() == 1
        })
        .await;
    let d = r
        .api_get(&format!("/api/v1/deliveries/{}", plan[0]["id"]))
        .await;
    let detail = d["attempt_log"][0]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("dry run: would change") && detail.contains(expected),
        "{detail}"
    );
    assert_eq!(datastores().await, before, "the shadow moved nothing");

    c.post_event(alarm("red")).await.unwrap();
    r.wait_deliveries("trigger=storage-relief&state=succeeded", 20, |l| {
        l.len() == 1
    })
    .await;
    assert_eq!(datastores().await, json!([expected]));

    // Within the throttle window a second red alarm is recorded as throttled, not run.
    c.post_event(alarm("red")).await.unwrap();
    r.wait_deliveries("trigger=storage-relief&state=throttled", 20, |l| {
        l.len() == 1
    })
    .await;
    r.stop().await;
}

/// Seed 000's quarantine (examples/quarantine.yaml): a log alert disconnects the VM's NICs;
/// an identical alert within the throttle window does nothing; a VM protected by a tag is
/// refused and keeps its NICs; a request without the token is refused.
#[tokio::test]
async fn scenario_quarantine_disconnects_once_and_refuses_protected_vms() {
    let sim = Simulator::start();
    let c = crate::vsphere::client(&sim).await;
    let (open, protected) = (
        c.find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
            .await
            .unwrap(),
        c.find_vm(&VmSelector::Name("DC0_H0_VM1".into()))
            .await
            .unwrap(),
    );
    for vm in [&open, &protected] {
        c.set_nics_connected(vm, true, None).await.unwrap();
    }
    c.tag(&protected, "reflex", "never", false, true)
        .await
        .unwrap();
    std::env::set_var("LOGINSIGHT_TOKEN", "li-t0ken-for-the-test");
    let r = Reflex::start(&example_on_simulator("quarantine.yaml", &sim)).await;
    let alert = |vm: &str, token: &str| {
        r.client
            .post(format!("{}/hooks/loginsight", r.http))
            .bearer_auth(token)
            .json(&json!({"alert": "compromised", "vm": vm}))
            .send()
    };
    assert_eq!(alert("DC0_H0_VM0", "wrong").await.unwrap().status(), 401);
    assert_eq!(
        alert("DC0_H0_VM0", "li-t0ken-for-the-test")
            .await
            .unwrap()
            .status(),
        202
    );
    r.wait_deliveries("trigger=quarantine&state=succeeded", 20, |l| l.len() == 1)
        .await;
    let nics = |vm: vsphere::MoRef| {
        let c = &c;
        async move {
            c.nic_connection(&vm)
                .await
                .unwrap()
                .into_iter()
                .map(|(_, conn, start)| (conn, start))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(nics(open.clone()).await, vec![(false, false)]);
    // The same alert again within 10 minutes: throttled, nothing run.
    assert_eq!(
        alert("DC0_H0_VM0", "li-t0ken-for-the-test")
            .await
            .unwrap()
            .status(),
        202
    );
    r.wait_deliveries("trigger=quarantine&state=throttled", 20, |l| l.len() == 1)
        .await;
    // A protected VM: refused with the rule, NICs untouched.
    assert_eq!(
        alert("DC0_H0_VM1", "li-t0ken-for-the-test")
            .await
            .unwrap()
            .status(),
        202
    );
    let dead = r
        .wait_deliveries("trigger=quarantine&state=dead", 20, |l| l.len() == 1)
        .await;
    assert!(
        dead[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("tag `reflex/never`"),
        "{}",
        dead[0]
    );
    assert_eq!(nics(protected).await, vec![(true, true)]);
    r.stop().await;
}

/// Seed 000 over syslog (examples/syslog-quarantine.yaml): a line over TCP saying a VM is
/// compromised disconnects its NICs (read back: connected and start-connected false); the
/// same line again within 10 minutes is throttled; a line no rule matches is counted and
/// stored nowhere; a protected VM is refused with the rule and keeps its NICs.
#[tokio::test]
async fn scenario_quarantine_from_a_syslog_line() {
    use tokio::io::AsyncWriteExt;
    let sim = Simulator::start();
    let c = crate::vsphere::client(&sim).await;
    let (open, protected) = (
        c.find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
            .await
            .unwrap(),
        c.find_vm(&VmSelector::Name("DC0_H0_VM1".into()))
            .await
            .unwrap(),
    );
    for vm in [&open, &protected] {
        c.set_nics_connected(vm, true, None).await.unwrap();
    }
    let (tcp, udp) = (
        crate::e2e_binary::free_port(),
        crate::e2e_binary::free_port(),
    );
    let yaml = example_on_simulator("syslog-quarantine.yaml", &sim)
        .replace("tcp: 0.0.0.0:6514", &format!("tcp: 127.0.0.1:{tcp}"))
        .replace("udp: 0.0.0.0:5514", &format!("udp: 127.0.0.1:{udp}"))
        .replace(
            "    password: ${env:REFLEX_IT_VC_PASSWORD}\n",
            "    password: ${env:REFLEX_IT_VC_PASSWORD}\n    insecure: true\n    loop_guard: false\n    protect: {names: [DC0_H0_VM1]}\n",
        );
    assert!(yaml.contains("protect:"), "{yaml}");
    let r = Reflex::start(&yaml).await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", tcp))
        .await
        .unwrap();
    let line = |vm: &str| {
        format!(
            "<34>1 2026-11-30T10:00:00Z ids01 suricata 77 - - VM {vm} is compromised: C2 beacon\n"
        )
    };
    conn.write_all(line("DC0_H0_VM0").as_bytes()).await.unwrap();
    r.wait_deliveries("trigger=quarantine&state=succeeded", 20, |l| l.len() == 1)
        .await;
    let nics = |vm: vsphere::MoRef| {
        let c = &c;
        async move {
            c.nic_connection(&vm)
                .await
                .unwrap()
                .into_iter()
                .map(|(_, conn, start)| (conn, start))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(nics(open.clone()).await, vec![(false, false)]);
    conn.write_all(line("DC0_H0_VM0").as_bytes()).await.unwrap();
    r.wait_deliveries("trigger=quarantine&state=throttled", 20, |l| l.len() == 1)
        .await;
    conn.write_all(b"<34>1 2026-11-30T10:00:01Z ids01 suricata 77 - - all quiet\n")
        .await
        .unwrap();
    conn.write_all(line("DC0_H0_VM1").as_bytes()).await.unwrap();
    let dead = r
        .wait_deliveries("trigger=quarantine&state=dead", 20, |l| l.len() == 1)
        .await;
    assert!(
        dead[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("refused by a guard rail"),
        "{}",
        dead[0]
    );
    assert_eq!(nics(protected).await, vec![(true, true)]);
    let m = r.metrics().await;
    assert!(
        m.contains("reflex_events_rejected_total{source=\"syslog\",reason=\"unmatched\"} 1"),
        "{m}"
    );
    let events = r.api_get("/api/v1/events?limit=100").await;
    assert_eq!(events["events"].as_array().unwrap().len(), 3, "{events:#}");
    r.stop().await;
}

/// One signed `/iaas` slash command, as Slack sends it; its acknowledgement.
async fn iaas(r: &Reflex, text: &str, user: &str, channel: &str, response_url: &str) {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("team_id", "T1DC2JH3J")
        .append_pair("channel_id", channel)
        .append_pair("user_id", user)
        .append_pair("user_name", user)
        .append_pair("command", "/iaas")
        .append_pair("text", text)
        .append_pair("response_url", response_url)
        .append_pair("trigger_id", &format!("{text}-{user}"))
        .finish();
    let ts = chrono::Utc::now().timestamp();
    let sig = crate::sources::slack_signature(crate::sources::SLACK_SECRET, ts, &body);
    let resp = r
        .client
        .post(format!("{}/slack", r.http))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", ts.to_string())
        .header("x-slack-signature", sig)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{text}: {}", resp.text().await.unwrap());
}

/// Waits until the simulator has a VM named `name` (`true`) or has none (`false`).
async fn wait_vm(c: &vsphere::Client, name: &str, exists: bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let found = c.find_vm(&VmSelector::Name(name.into())).await.is_ok();
        if found == exists {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "VM {name} exists: {found}, expected {exists}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn power_state(c: &vsphere::Client, name: &str) -> String {
    let vm = c.find_vm(&VmSelector::Name(name.into())).await.unwrap();
    c.power_state(&vm).await.unwrap()
}

/// Clicks an approval button in Slack: a signed interactive payload.
async fn click(r: &Reflex, user: &str, action: &str, approval: &Value, response_url: &str) {
    let payload = json!({
        "type": "block_actions",
        "user": {"id": user, "username": "kim.ops", "team_id": "T1DC2JH3J"},
        "trigger_id": format!("click-{user}-{action}-{approval}"),
        "response_url": response_url,
        "actions": [{"type": "button", "action_id": action, "value": approval.to_string(), "block_id": "b1"}],
    });
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &payload.to_string())
        .finish();
    let ts = chrono::Utc::now().timestamp();
    let sig = crate::sources::slack_signature(crate::sources::SLACK_SECRET, ts, &body);
    let resp = r
        .client
        .post(format!("{}/slack", r.http))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", ts.to_string())
        .header("x-slack-signature", sig)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

/// The next body posted to `rx`, within 20 s.
async fn next_body(rx: &mut crate::common::Receiver) -> String {
    let m = tokio::time::timeout(std::time::Duration::from_secs(20), rx.rx.recv())
        .await
        .expect("nothing was posted")
        .unwrap();
    String::from_utf8_lossy(&m.body).to_string()
}

/// Seed 001's self-service IaaS (examples/slack-selfservice.yaml): signed `/iaas` commands
/// create a VM, clone one (powered on), deploy one from a template, power a VM off, on and
/// reset, each read back from the simulator. `delete` waits for an approval showing its
/// plan, posted to the approvals webhook, and deletes nothing until someone approves; a
/// rejected delete deletes nothing and ends dead with who rejected it and why.
#[tokio::test]
async fn scenario_self_service_from_slack_with_approval_for_delete() {
    let sim = Simulator::start();
    let c = crate::vsphere::client(&sim).await;
    let mut rx = crate::common::Receiver::start().await;
    std::env::set_var("REFLEX_IT_SLACK_SECRET", crate::sources::SLACK_SECRET);
    std::env::set_var("REFLEX_IT_SLACK_APPROVALS", rx.url());
    let yaml = example_on_simulator("slack-selfservice.yaml", &sim)
        .replace(
            "${env:SLACK_SIGNING_SECRET}",
            "${env:REFLEX_IT_SLACK_SECRET}",
        )
        .replace(
            "${env:SLACK_APPROVALS_WEBHOOK}",
            "${env:REFLEX_IT_SLACK_APPROVALS}",
        );
    let r = Reflex::start(&yaml).await;
    let reply = rx.url();
    let user = |t| iaas(&r, t, "U0USER", "C0IAAS", &reply);

    user("create web-new").await;
    r.wait_deliveries("trigger=slack-create&state=succeeded", 30, |l| l.len() == 1)
        .await;
    wait_vm(&c, "web-new", true).await;
    user("clone DC0_H0_VM0 as web-copy").await;
    wait_vm(&c, "web-copy", true).await;
    r.wait_deliveries("trigger=slack-clone&state=succeeded", 30, |l| l.len() == 1)
        .await;
    assert_eq!(power_state(&c, "web-copy").await, "poweredOn");

    // A template (made here: the simulator has none) to deploy from.
    c.clone_vm(
        &VmSelector::Name("DC0_H0_VM1".into()),
        &vsphere::vm::CloneSpec {
            name: "tmpl-small".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let tmpl = c
        .find_vm(&VmSelector::Name("tmpl-small".into()))
        .await
        .unwrap();
    c.call("MarkAsTemplate", &tmpl, vec![]).await.unwrap();
    user("deploy tmpl-small as from-tmpl").await;
    wait_vm(&c, "from-tmpl", true).await;
    r.wait_deliveries("trigger=slack-clone&state=succeeded", 30, |l| l.len() == 2)
        .await;
    assert_eq!(power_state(&c, "from-tmpl").await, "poweredOn");

    user("power off web-copy").await;
    r.wait_deliveries("trigger=slack-power-off&state=succeeded", 30, |l| {
        l.len() == 1
    })
    .await;
    assert_eq!(power_state(&c, "web-copy").await, "poweredOff");
    user("power on web-copy").await;
    r.wait_deliveries("trigger=slack-power-on&state=succeeded", 30, |l| {
        l.len() == 1
    })
    .await;
    assert_eq!(power_state(&c, "web-copy").await, "poweredOn");
    user("power reset web-copy").await;
    r.wait_deliveries("trigger=slack-power-reset&state=succeeded", 30, |l| {
        l.len() == 1
    })
    .await;
    assert_eq!(power_state(&c, "web-copy").await, "poweredOn");

    // Delete: only the admins may ask, and it waits for an approval.
    iaas(&r, "delete web-copy", "U0ADMIN1", "C0OPS", &reply).await;
    let a = crate::approvals::wait_approval(&r, "slack-delete", "waiting", 30).await;
    assert!(
        a["plan"].as_str().unwrap().contains("would"),
        "the approver sees the plan: {a:#}"
    );
    // The approvals webhook hears of it (other posts are the channel's announcements).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let m = tokio::time::timeout_at(deadline, rx.rx.recv())
            .await
            .expect("the approval was not posted")
            .unwrap();
        let body = String::from_utf8_lossy(&m.body).to_string();
        if body.contains(&format!("Approval #{}", a["id"])) {
            assert!(body.contains("reflex approve"), "{body}");
            assert!(
                body.contains(r#""action_id":"reflex.approve""#)
                    && body.contains(&format!(r#""value":"{}""#, a["id"])),
                "the message has the buttons: {body}"
            );
            break;
        }
    }
    // A click by someone who is not an approver is refused and decides nothing.
    let mut answers = crate::common::Receiver::start().await;
    click(&r, "U0USER", "reflex.approve", &a["id"], &answers.url()).await;
    let m = next_body(&mut answers).await;
    assert!(m.contains("You may not decide approval"), "{m}");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    wait_vm(&c, "web-copy", true).await;
    let still = r.api_get(&format!("/api/v1/approvals/{}", a["id"])).await;
    assert_eq!(still["state"], "waiting", "{still:#}");
    // An approver's click approves it: the VM is deleted and the message says by whom.
    click(&r, "U0ADMIN2", "reflex.approve", &a["id"], &answers.url()).await;
    let m = next_body(&mut answers).await;
    assert!(
        m.contains(r#""replace_original":true"#) && m.contains("approved by <@U0ADMIN2>"),
        "{m}"
    );
    wait_vm(&c, "web-copy", false).await;
    let done = r
        .wait_deliveries("trigger=slack-delete&state=succeeded", 30, |l| l.len() == 1)
        .await;
    let decided = r.api_get(&format!("/api/v1/approvals/{}", a["id"])).await;
    assert_eq!(
        decided["decided_by"], "kim.ops (U0ADMIN2) in Slack",
        "{decided:#}"
    );
    let record = r
        .api_get(&format!("/api/v1/deliveries/{}", done[0]["id"]))
        .await;
    assert!(
        record
            .to_string()
            .contains("by kim.ops (U0ADMIN2) in Slack"),
        "who approved is in the attempt's record: {record:#}"
    );
    // Clicking again cannot decide it twice.
    click(&r, "U0ADMIN1", "reflex.reject", &a["id"], &answers.url()).await;
    let m = next_body(&mut answers).await;
    assert!(
        m.contains("was not decided") && m.contains("approved already"),
        "{m}"
    );

    // A rejected delete deletes nothing.
    iaas(&r, "delete web-new", "U0ADMIN1", "C0OPS", &reply).await;
    let b = loop {
        let b = crate::approvals::wait_approval(&r, "slack-delete", "waiting", 30).await;
        if b["id"] != a["id"] {
            break b;
        }
    };
    let resp = crate::approvals::decide(
        &r,
        &b["id"],
        "reject",
        json!({"by": "U0ADMIN2", "reason": "still in use"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let dead = r
        .wait_deliveries("trigger=slack-delete&state=dead", 30, |l| l.len() == 1)
        .await;
    let why = dead[0]["last_error"].as_str().unwrap();
    assert!(
        why.contains("rejected by U0ADMIN2: still in use") && why.contains("nothing was changed"),
        "{why}"
    );
    wait_vm(&c, "web-new", true).await;
}
