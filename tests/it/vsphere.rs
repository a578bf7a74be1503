//! reflex against govmomi's vCenter simulator: the quarantine action read back through the
//! API, the vcenter source's CloudEvents, checkpoint resume, posted alarms, and a simulator
//! restart (stalled / reconnected).

use crate::common::{Receiver, Reflex};
use serde_json::json;
use std::time::Duration;
use vsphere::sim::Simulator;
use vsphere::vm::{PowerOp, VmSelector};
use vsphere::{Client, ConnectOptions, Node};

pub(crate) async fn client(sim: &Simulator) -> Client {
    Client::connect(ConnectOptions {
        url: sim.url.clone(),
        username: "user".into(),
        password: "pass".into(),
        insecure: true,
        ca_pem: None,
        thumbprint: None,
        timeout: Duration::from_secs(30),
    })
    .await
    .unwrap()
}

fn vcenters(sim: &Simulator) -> String {
    std::env::set_var("REFLEX_IT_VC_PASSWORD", "pass");
    format!(
        "vcenters:\n  vc1:\n    url: {}\n    username: user\n    password: ${{env:REFLEX_IT_VC_PASSWORD}}\n    insecure: true\n    loop_guard: false\n",
        sim.url
    )
}

async fn nic_state(c: &Client, vm: &str) -> Vec<(bool, bool)> {
    let vm = c.find_vm(&VmSelector::Name(vm.into())).await.unwrap();
    c.nic_connection(&vm)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, conn, start)| (conn, start))
        .collect()
}

#[tokio::test]
async fn quarantine_disconnects_the_vms_nics() {
    let sim = Simulator::start();
    let c = client(&sim).await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    c.set_nics_connected(&vm, true, None).await.unwrap();
    assert_eq!(nic_state(&c, "DC0_H0_VM0").await, vec![(true, true)]);

    let r = Reflex::start(&format!(
        r#"{}
sources:
  - name: logs
    type: webhook
    path: /hooks/logs
    mapping: {{type: "security.{{{{ body.alert }}}}", subject: "{{{{ body.vm }}}}"}}
triggers:
  - name: quarantine
    filters: [{{exact: {{type: security.compromised}}}}]
    action:
      type: vsphere.disconnect_nics
      vcenter: vc1
      vm: {{name: "{{{{ event.subject }}}}"}}
    delivery: {{max_attempts: 3, backoff: 100ms}}
"#,
        vcenters(&sim)
    ))
    .await;
    let resp = r
        .post_json(
            "/hooks/logs",
            &json!({"alert": "compromised", "vm": "DC0_H0_VM0"}),
        )
        .await;
    assert_eq!(resp.status(), 202);
    let ok = r
        .wait_deliveries("state=succeeded", 20, |l| l.len() == 1)
        .await;
    assert_eq!(nic_state(&c, "DC0_H0_VM0").await, vec![(false, false)]);
    let d = r
        .api_get(&format!("/api/v1/deliveries/{}", ok[0]["id"]))
        .await;
    assert!(
        d["attempt_log"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("changed"),
        "{d}"
    );

    // Idempotent: a second alert changes nothing and says so.
    r.post_json(
        "/hooks/logs",
        &json!({"alert": "compromised", "vm": "DC0_H0_VM0"}),
    )
    .await;
    let ok = r
        .wait_deliveries("state=succeeded", 20, |l| l.len() == 2)
        .await;
    let d = r
        .api_get(&format!("/api/v1/deliveries/{}", ok[0]["id"]))
        .await;
    assert!(
        d["attempt_log"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("already so"),
        "{d}"
    );

    // A VM that does not exist: dead at once (permanent), with the reason.
    r.post_json(
        "/hooks/logs",
        &json!({"alert": "compromised", "vm": "no-such-vm"}),
    )
    .await;
    let dead = r.wait_deliveries("state=dead", 20, |l| l.len() == 1).await;
    assert_eq!(dead[0]["attempts"], 1);
    assert!(
        dead[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("not found"),
        "{}",
        dead[0]
    );
    r.stop().await;
}

#[tokio::test]
async fn vcenter_events_become_cloudevents_and_resume_from_the_checkpoint() {
    let sim = Simulator::start();
    let c = client(&sim).await;
    let mut rcv = Receiver::start().await;
    let cfg = format!(
        r#"{}
sources:
  - name: vc1-events
    type: vcenter
    vcenter: vc1
    poll_interval: 100ms
triggers:
  - name: all-vm-events
    filters: [{{prefix: {{type: com.vmware.vsphere.Vm}}}}]
    action: {{type: http, url: "{}"}}
  - name: red-cpu
    filters: [{{exact: {{type: com.vmware.vsphere.AlarmStatusChangedEvent.v0}}}}]
    when: 'event.data.Alarm.Name == "VM CPU Usage" && event.data.To == "red"'
    action: {{type: http, url: "{}", mode: structured}}
"#,
        vcenters(&sim),
        rcv.url(),
        rcv.url()
    );
    let r = Reflex::start(&cfg).await;
    // First start begins at "now": the simulator's start-up events are not replayed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    rcv.nothing_for(300).await;

    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM1".into()))
        .await
        .unwrap();
    c.power(&vm, PowerOp::Off).await.unwrap();
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(t, _): &(String, _)| t == "com.vmware.vsphere.VmPoweredOffEvent.v0")
    {
        let got = rcv.next(10).await;
        seen.push((got.headers["ce-type"].to_str().unwrap().to_string(), got));
    }
    let (_, off) = seen
        .iter()
        .find(|(t, _)| t == "com.vmware.vsphere.VmPoweredOffEvent.v0")
        .unwrap();
    assert_eq!(off.headers["ce-source"], sim.url.as_str());
    assert_eq!(off.headers["ce-subject"], "VmPoweredOffEvent");
    assert_eq!(off.headers["ce-eventclass"], "event");
    assert!(!off.headers["ce-vsphereapiversion"].is_empty());
    assert!(off.headers.contains_key("ce-time"));
    let off_id = off.headers["ce-id"].to_str().unwrap().to_string();
    assert!(
        off_id.parse::<i64>().is_ok(),
        "the id is the vCenter event key"
    );
    let data: serde_json::Value = serde_json::from_slice(&off.body).unwrap();
    assert_eq!(data["Vm"]["Name"], "DC0_H0_VM1");
    assert_eq!(data["Vm"]["Vm"]["Type"], "VirtualMachine");
    assert_eq!(data["Key"].as_i64().unwrap().to_string(), off_id);
    assert!(data["FullFormattedMessage"]
        .as_str()
        .unwrap()
        .contains("powered off"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    while rcv.rx.try_recv().is_ok() {}

    // While reflex is down, the VM powers on; after the restart those events arrive, and
    // the power-off is not delivered again.
    let dir = r.stop().await;
    c.power(&vm, PowerOp::On).await.unwrap();
    let r = Reflex::start_in(&cfg, dir).await;
    let mut types = Vec::new();
    while !types
        .iter()
        .any(|t: &String| t == "com.vmware.vsphere.VmPoweredOnEvent.v0")
    {
        let got = rcv.next(10).await;
        assert_ne!(
            got.headers["ce-id"].to_str().unwrap(),
            off_id,
            "an event before the checkpoint was delivered again"
        );
        types.push(got.headers["ce-type"].to_str().unwrap().to_string());
    }
    assert!(
        types.contains(&"com.vmware.vsphere.VmStartingEvent.v0".to_string()),
        "{types:?}"
    );

    // A posted alarm arrives and its data drives the expression filter.
    for (name, to) in [("VM Memory Usage", "red"), ("VM CPU Usage", "red")] {
        let alarm = vsphere::events::alarm_status_changed(&vm, "DC0_H0_VM1", name, "yellow", to);
        c.post_event(alarm).await.unwrap();
    }
    let got = rcv.next(10).await;
    assert_eq!(got.headers["content-type"], "application/cloudevents+json");
    let ev: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(ev["type"], "com.vmware.vsphere.AlarmStatusChangedEvent.v0");
    assert_eq!(ev["data"]["Alarm"]["Name"], "VM CPU Usage");
    rcv.nothing_for(500).await;
    let m = r.metrics().await;
    assert!(
        m.contains(r#"reflex_source_up{source="vc1-events"} 1"#),
        "{m}"
    );
    assert!(m.contains("reflex_vcenter_lag_seconds"), "{m}");
    r.stop().await;
}

#[tokio::test]
async fn a_simulator_restart_is_announced_and_survived() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("-listen=127.0.0.1:{port}");
    let sim = Simulator::start_with(&[&listen]);
    let mut rcv = Receiver::start().await;
    let r = Reflex::start(&format!(
        r#"{}
sources:
  - name: vc1-events
    type: vcenter
    vcenter: vc1
    poll_interval: 100ms
    stall_after: 2
triggers:
  - name: health
    filters: [{{prefix: {{type: com.reflex.source.}}}}]
    action: {{type: http, url: "{}"}}
  - name: vm
    filters: [{{exact: {{type: com.vmware.vsphere.VmPoweredOffEvent.v0}}}}]
    action: {{type: http, url: "{}"}}
"#,
        vcenters(&sim),
        rcv.url(),
        rcv.url()
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sim.stop();
    let got = rcv.next(20).await;
    assert_eq!(got.headers["ce-type"], "com.reflex.source.stalled");
    let sim = Simulator::start_with(&[&listen]);
    let got = rcv.next(30).await;
    assert_eq!(got.headers["ce-type"], "com.reflex.source.reconnected");
    // The new simulator's events flow (its keys restarted; the source follows).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = client(&sim).await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    c.power(&vm, PowerOp::Off).await.unwrap();
    let got = rcv.next(20).await;
    assert_eq!(
        got.headers["ce-type"],
        "com.vmware.vsphere.VmPoweredOffEvent.v0"
    );
    let m = r.metrics().await;
    assert!(
        m.contains(r#"reflex_source_stalls_total{source="vc1-events"} 1"#),
        "{m}"
    );
    r.stop().await;
}

#[tokio::test]
async fn scenarios_maintenance_sync_storage_relief_tagging_and_self_service() {
    let sim = Simulator::start();
    let c = client(&sim).await;
    let mut rest = Receiver::start().await;
    let r = Reflex::start(&format!(
        r#"{vc}
secrets:
  vrops: s3cret
sources:
  - name: vc1-events
    type: vcenter
    vcenter: vc1
    poll_interval: 100ms
  - name: api-cmds
    type: cloudevents
    path: /cmds
triggers:
  - name: maintenance-sync
    filters: [{{exact: {{type: com.vmware.vsphere.EnteredMaintenanceModeEvent.v0}}}}]
    action:
      type: http_request
      method: PUT
      url: "http://{rest}/suite-api/hosts/{{{{ event.data.Host.Name }}}}/maintained"
      headers: {{Authorization: "vRealizeOpsToken {{{{ secrets.vrops }}}}"}}
  - name: storage-relief
    filters: [{{exact: {{type: com.vmware.vsphere.AlarmStatusChangedEvent.v0}}}}]
    when: 'event.data.Alarm.Name == "VM Storage Usage" && event.data.To == "red"'
    action: {{type: vsphere.relocate, vcenter: vc1, vm: {{moid: "{{{{ event.data.Vm.Vm.Value }}}}"}}, allowed_datastores: [LocalDS_1]}}
  - name: size-tag
    filters: [{{exact: {{type: com.vmware.vsphere.AlarmStatusChangedEvent.v0}}}}]
    when: 'event.data.Alarm.Name == "VM CPU Usage" && event.data.To == "red"'
    action: {{type: vsphere.tag, vcenter: vc1, vm: {{name: "{{{{ event.data.Vm.Name }}}}"}}, category: reflex-size, tag: cpu-up, replace: true, create: true}}
  - name: clone
    filters: [{{exact: {{type: iaas.clone}}}}]
    action: {{type: vsphere.clone_vm, vcenter: vc1, vm: {{name: "{{{{ event.data.from }}}}"}}, name: "{{{{ event.data.name }}}}", power_on: true}}
  - name: delete
    filters: [{{exact: {{type: iaas.delete}}}}]
    action: {{type: vsphere.delete_vm, vcenter: vc1, vm: {{name: "{{{{ event.data.name }}}}"}}, power_off: true}}
  - name: host-maintenance
    filters: [{{exact: {{type: iaas.maintenance}}}}]
    action: {{type: vsphere.host_maintenance, vcenter: vc1, host: "{{{{ event.data.host }}}}", mode: enter}}
"#,
        vc = vcenters(&sim),
        rest = rest.addr
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    // Maintenance sync (seed 003): the event (posted: the simulator emits none) marks the host.
    let host = c.find_by_name("HostSystem", "DC0_H0").await.unwrap();
    c.post_event(
        Node::new("event")
            .typed("EnteredMaintenanceModeEvent")
            .with(Node::text("key", "0"))
            .with(Node::text("chainId", "0"))
            .with(Node::text("createdTime", "2026-01-01T00:00:00Z"))
            .with(Node::text("userName", ""))
            .with(
                Node::new("host")
                    .with(Node::text("name", "DC0_H0"))
                    .with(host.node("host")),
            )
            .with(Node::text(
                "fullFormattedMessage",
                "Host DC0_H0 in DC0 has entered maintenance mode",
            )),
    )
    .await
    .unwrap();
    let got = rest.next(10).await;
    assert_eq!(got.headers["authorization"], "vRealizeOpsToken s3cret");

    // Storage relief (seed 004) and size tagging.
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    c.post_event(vsphere::events::alarm_status_changed(
        &vm,
        "DC0_H0_VM0",
        "VM Storage Usage",
        "yellow",
        "red",
    ))
    .await
    .unwrap();
    c.post_event(vsphere::events::alarm_status_changed(
        &vm,
        "DC0_H0_VM0",
        "VM CPU Usage",
        "yellow",
        "red",
    ))
    .await
    .unwrap();
    r.wait_deliveries("state=succeeded", 20, |l| {
        l.iter()
            .filter(|d| d["trigger"] == "storage-relief" || d["trigger"] == "size-tag")
            .count()
            == 2
    })
    .await;
    let ds = c.property(&vm, "datastore").await.unwrap().unwrap();
    let ds = vsphere::MoRef::from_node(&ds.children[0]).unwrap();
    assert_eq!(
        c.property(&ds, "name").await.unwrap().unwrap().text,
        "LocalDS_1"
    );
    assert_eq!(
        c.tag_names(&vm, "reflex-size").await.unwrap(),
        vec!["cpu-up"]
    );

    // Self-service: clone (powered on), then delete it; host maintenance.
    let cmd = |ty: &str, data: serde_json::Value| {
        json!({"specversion": "1.0", "id": uuid::Uuid::new_v4().to_string(), "source": "/chat", "type": ty, "datacontenttype": "application/json", "data": data}).to_string()
    };
    crate::common::post_ce(
        &r,
        "/cmds",
        cmd(
            "iaas.clone",
            json!({"from": "DC0_H0_VM1", "name": "web-42"}),
        ),
    )
    .await;
    r.wait_deliveries("trigger=clone&state=succeeded", 20, |l| l.len() == 1)
        .await;
    let clone = c.find_vm(&VmSelector::Name("web-42".into())).await.unwrap();
    assert_eq!(c.power_state(&clone).await.unwrap(), "poweredOn");
    crate::common::post_ce(&r, "/cmds", cmd("iaas.delete", json!({"name": "web-42"}))).await;
    r.wait_deliveries("trigger=delete&state=succeeded", 20, |l| l.len() == 1)
        .await;
    assert!(c.find_vm(&VmSelector::Name("web-42".into())).await.is_err());
    crate::common::post_ce(
        &r,
        "/cmds",
        cmd("iaas.maintenance", json!({"host": "DC0_C0_H1"})),
    )
    .await;
    r.wait_deliveries("trigger=host-maintenance&state=succeeded", 20, |l| {
        l.len() == 1
    })
    .await;
    let h1 = c.find_by_name("HostSystem", "DC0_C0_H1").await.unwrap();
    assert_eq!(
        c.property(&h1, "runtime.inMaintenanceMode")
            .await
            .unwrap()
            .unwrap()
            .text,
        "true"
    );
    r.stop().await;
}

#[tokio::test]
async fn two_vcenters_each_with_its_own_source_and_checkpoint() {
    let (sim1, sim2) = (Simulator::start(), Simulator::start());
    let mut rcv = Receiver::start().await;
    std::env::set_var("REFLEX_IT_VC_PASSWORD", "pass");
    let r = Reflex::start(&format!(
        r#"
vcenters:
  vc1: {{url: "{}", username: user, password: "${{env:REFLEX_IT_VC_PASSWORD}}", insecure: true, loop_guard: false}}
  vc2: {{url: "{}", username: user, password: "${{env:REFLEX_IT_VC_PASSWORD}}", insecure: true, loop_guard: false}}
sources:
  - {{name: vc1-events, type: vcenter, vcenter: vc1, poll_interval: 100ms}}
  - {{name: vc2-events, type: vcenter, vcenter: vc2, poll_interval: 100ms}}
triggers:
  - name: off
    filters: [{{exact: {{type: com.vmware.vsphere.VmPoweredOffEvent.v0}}}}]
    action: {{type: http, url: "{}"}}
"#,
        sim1.url,
        sim2.url,
        rcv.url()
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for sim in [&sim1, &sim2] {
        let c = client(sim).await;
        let vm = c
            .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
            .await
            .unwrap();
        c.power(&vm, PowerOp::Off).await.unwrap();
    }
    let mut sources = vec![
        rcv.next(10).await.headers["ce-source"]
            .to_str()
            .unwrap()
            .to_string(),
        rcv.next(10).await.headers["ce-source"]
            .to_str()
            .unwrap()
            .to_string(),
    ];
    sources.sort();
    let mut want = vec![sim1.url.clone(), sim2.url.clone()];
    want.sort();
    assert_eq!(sources, want);
    let dir = r.stop().await;
    let store = crate::common::open_backend(dir.path()).await.store;
    for s in ["vc1-events", "vc2-events"] {
        assert!(
            store
                .checkpoint(s)
                .await
                .unwrap()
                .is_some_and(|c| c.position > 0),
            "{s} has no checkpoint"
        );
    }
}

/// More events than one page between two reads: the source reads the ones before the page
/// from a fresh collector, and every event reaches the trigger once, in order.
#[tokio::test]
async fn more_than_a_page_between_two_reads_is_all_delivered() {
    let sim = Simulator::start();
    let c = client(&sim).await;
    let mut rcv = Receiver::start().await;
    let cfg = format!(
        r#"{}
sources:
  - {{name: vc1-events, type: vcenter, vcenter: vc1, poll_interval: 1s, page_size: 10}}
triggers:
  - name: probes
    filters: [{{exact: {{type: com.vmware.vsphere.GeneralUserEvent.v0}}}}]
    action: {{type: http, url: "{}"}}
    delivery: {{ordering_key: "all"}}
"#,
        vcenters(&sim),
        rcv.url(),
    );
    let r = Reflex::start(&cfg).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Posted faster than the source reads (the simulator gathers updates for 250 ms): the
    // page of 10 holds only the newest of them.
    const N: usize = 35;
    for i in 0..N {
        let msg = format!("burst {i:02}");
        c.post_event(vsphere::events::user_event(&msg))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..N {
        // Generous: once, in the PostgreSQL pass with the whole suite running on 2 cores,
        // an event took longer than 10 s.
        let body: serde_json::Value = serde_json::from_slice(&rcv.next(30).await.body).unwrap();
        got.push(body["FullFormattedMessage"].as_str().unwrap().to_string());
    }
    let want: Vec<String> = (0..N).map(|i| format!("burst {i:02}")).collect();
    assert_eq!(got, want, "every event once, in order");
    rcv.nothing_for(500).await;
    r.stop().await;
}

/// Guard rail: budgets read from the live inventory. With at most 1 host of a cluster in
/// maintenance mode, a second host's maintenance waits (recorded as waiting, with the host
/// already in maintenance named, the host read back unchanged) until the first one leaves
/// it, then runs; with at most 50% of a cluster's VMs off, powering off the second of its
/// two VMs waits until the first is on again. Nothing held is dead or lost.
/// Budget: at most a share of a cluster's VMs reconfigured per hour, counted from the
/// vCenter's own `VmReconfiguredEvent`s; past it the change is held, and a VM reconfigured
/// already this hour does not count twice.
#[tokio::test]
async fn a_reconfiguration_budget_holds_changes_past_the_clusters_hourly_share() {
    let sim = Simulator::start();
    let c = client(&sim).await;
    std::env::set_var("REFLEX_IT_VC_PASSWORD", "pass");
    let r = Reflex::start(&format!(
        r#"
vcenters:
  vc1:
    url: "{}"
    username: user
    password: "${{env:REFLEX_IT_VC_PASSWORD}}"
    insecure: true
    loop_guard: false
    budgets: {{vms_reconfigured_per_hour: 50%, recheck: 1s}}
sources:
  - {{name: cmds, type: cloudevents, path: /cmds}}
triggers:
  - name: resize
    filters: [{{exact: {{type: vm.resize}}}}]
    action: {{type: vsphere.reconfigure, vcenter: vc1, vm: {{name: "{{{{ event.data.vm }}}}"}}, cpus: "{{{{ event.data.cpus }}}}"}}
"#,
        sim.url
    ))
    .await;
    let resize = |vm: &str, cpus: u32| {
        json!({"specversion": "1.0", "id": uuid::Uuid::new_v4().to_string(), "source": "/ops", "type": "vm.resize",
               "datacontenttype": "application/json", "data": {"vm": vm, "cpus": cpus}}).to_string()
    };
    let cpus = |name: &'static str| {
        let c = &c;
        async move {
            let vm = c.find_vm(&VmSelector::Name(name.into())).await.unwrap();
            c.property(&vm, "config.hardware.numCPU")
                .await
                .unwrap()
                .unwrap()
                .text
        }
    };
    // Cluster DC0_C0 has two VMs: the first of them reconfigured is half of them.
    crate::common::post_ce(&r, "/cmds", resize("DC0_C0_RP0_VM0", 3)).await;
    r.wait_deliveries("trigger=resize&state=succeeded", 20, |l| l.len() == 1)
        .await;
    assert_eq!(cpus("DC0_C0_RP0_VM0").await, "3");
    let before = cpus("DC0_C0_RP0_VM1").await;
    crate::common::post_ce(&r, "/cmds", resize("DC0_C0_RP0_VM1", 3)).await;
    let held = r
        .wait_deliveries("trigger=resize&state=retrying", 20, |l| l.len() == 1)
        .await;
    let why = held[0]["last_error"].as_str().unwrap();
    assert!(
        why.contains("held by a budget: 1 of the 2 VMs of cluster `DC0_C0` were reconfigured within the last hour; one more would be 100%; at most 50% per hour"),
        "{why}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        cpus("DC0_C0_RP0_VM1").await,
        before,
        "held: nothing changed"
    );
    // The VM reconfigured already this hour may be changed again.
    crate::common::post_ce(&r, "/cmds", resize("DC0_C0_RP0_VM0", 2)).await;
    r.wait_deliveries("trigger=resize&state=succeeded", 20, |l| l.len() == 2)
        .await;
    assert_eq!(cpus("DC0_C0_RP0_VM0").await, "2");
    assert_eq!(cpus("DC0_C0_RP0_VM1").await, before, "still held");
    r.assert_guard_rail("budget", "held").await;
    r.stop().await;
}

/// Two changes under one budget started together: the second reads the budget only once
/// the first is made, so a budget of one host in maintenance lets one host in, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_started_together_take_turns_at_a_clusters_budget() {
    let sim = Simulator::start();
    let c = client(&sim).await;
    std::env::set_var("REFLEX_IT_VC_PASSWORD", "pass");
    let r = Reflex::start(&format!(
        r#"
vcenters:
  vc1:
    url: "{}"
    username: user
    password: "${{env:REFLEX_IT_VC_PASSWORD}}"
    insecure: true
    loop_guard: false
    budgets: {{hosts_in_maintenance: 1, recheck: 1s}}
sources:
  - {{name: cmds, type: cloudevents, path: /cmds}}
triggers:
  - name: maintenance
    filters: [{{exact: {{type: host.maintenance}}}}]
    action: {{type: vsphere.host_maintenance, vcenter: vc1, host: "{{{{ event.data.host }}}}", mode: enter}}
    delivery: {{concurrency: 4}}
"#,
        sim.url
    ))
    .await;
    let cmd = |host: &str| {
        json!({"specversion": "1.0", "id": uuid::Uuid::new_v4().to_string(), "source": "/ops", "type": "host.maintenance", "datacontenttype": "application/json", "data": {"host": host}}).to_string()
    };
    // Both accepted before either attempt starts.
    let (a, b) = tokio::join!(
        crate::common::post_ce(&r, "/cmds", cmd("DC0_C0_H0")),
        crate::common::post_ce(&r, "/cmds", cmd("DC0_C0_H1")),
    );
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (202, 202));
    r.wait_deliveries("trigger=maintenance&state=succeeded", 20, |l| l.len() == 1)
        .await;
    let held = r
        .wait_deliveries("trigger=maintenance&state=retrying", 20, |l| l.len() == 1)
        .await;
    let why = held[0]["last_error"].as_str().unwrap();
    assert!(why.contains("held by a budget"), "{why}");
    // Checked again every second meanwhile; still one host in maintenance.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut inside = Vec::new();
    for name in ["DC0_C0_H0", "DC0_C0_H1"] {
        let h = c.find_by_name("HostSystem", name).await.unwrap();
        if c.property(&h, "runtime.inMaintenanceMode")
            .await
            .unwrap()
            .unwrap()
            .text
            == "true"
        {
            inside.push(name);
        }
    }
    assert_eq!(
        inside.len(),
        1,
        "at most one host in maintenance: {inside:?}"
    );
    let d = r
        .api_get(&format!("/api/v1/deliveries/{}", held[0]["id"]))
        .await;
    assert_eq!(d["state"], "retrying", "{d:#}");
}

#[tokio::test]
async fn budgets_hold_changes_past_the_clusters_limits_until_there_is_room() {
    let sim = Simulator::start();
    let c = client(&sim).await;
    std::env::set_var("REFLEX_IT_VC_PASSWORD", "pass");
    let r = Reflex::start(&format!(
        r#"
vcenters:
  vc1:
    url: "{}"
    username: user
    password: "${{env:REFLEX_IT_VC_PASSWORD}}"
    insecure: true
    loop_guard: false
    budgets: {{hosts_in_maintenance: 1, vms_powered_off: 50%, recheck: 1s}}
sources:
  - {{name: cmds, type: cloudevents, path: /cmds}}
triggers:
  - name: maintenance
    filters: [{{exact: {{type: host.maintenance}}}}]
    action: {{type: vsphere.host_maintenance, vcenter: vc1, host: "{{{{ event.data.host }}}}", mode: enter}}
  - name: power-off
    filters: [{{exact: {{type: vm.off}}}}]
    action: {{type: vsphere.power, vcenter: vc1, vm: {{name: "{{{{ event.data.vm }}}}"}}, op: "off"}}
"#,
        sim.url
    ))
    .await;
    let cmd = |ty: &str, data: serde_json::Value| {
        json!({"specversion": "1.0", "id": uuid::Uuid::new_v4().to_string(), "source": "/ops", "type": ty, "datacontenttype": "application/json", "data": data}).to_string()
    };
    let in_maintenance = |name: &'static str| {
        let c = &c;
        async move {
            let h = c.find_by_name("HostSystem", name).await.unwrap();
            c.property(&h, "runtime.inMaintenanceMode")
                .await
                .unwrap()
                .unwrap()
                .text
                == "true"
        }
    };
    crate::common::post_ce(
        &r,
        "/cmds",
        cmd("host.maintenance", json!({"host": "DC0_C0_H0"})),
    )
    .await;
    r.wait_deliveries("trigger=maintenance&state=succeeded", 20, |l| l.len() == 1)
        .await;
    assert!(in_maintenance("DC0_C0_H0").await);
    crate::common::post_ce(
        &r,
        "/cmds",
        cmd("host.maintenance", json!({"host": "DC0_C0_H1"})),
    )
    .await;
    let held = r
        .wait_deliveries("trigger=maintenance&state=retrying", 20, |l| l.len() == 1)
        .await;
    let why = held[0]["last_error"].as_str().unwrap();
    assert!(
        why.contains("held by a budget: 1 of the 3 hosts of cluster `DC0_C0` in maintenance mode already (DC0_C0_H0); at most 1 at once"),
        "{why}"
    );
    // Held, not failing: checked again every second, and nothing changes meanwhile.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!in_maintenance("DC0_C0_H1").await);
    let d = r
        .api_get(&format!("/api/v1/deliveries/{}", held[0]["id"]))
        .await;
    let log = d["attempt_log"].as_array().unwrap();
    assert!(log.len() >= 2, "checked again: {d:#}");
    assert!(log.iter().all(|a| a["outcome"] == "waiting"), "{d:#}");
    assert_eq!(d["state"], "retrying", "{d:#}");
    // The first host leaves maintenance mode: the second one goes in.
    let h0 = c.find_by_name("HostSystem", "DC0_C0_H0").await.unwrap();
    c.run_task(
        "ExitMaintenanceMode_Task",
        &h0,
        vec![Node::text("timeout", "0")],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    r.wait_deliveries("trigger=maintenance&state=succeeded", 20, |l| l.len() == 2)
        .await;
    assert!(in_maintenance("DC0_C0_H1").await);

    // VMs: the cluster has two; one may be off at a time.
    crate::common::post_ce(&r, "/cmds", cmd("vm.off", json!({"vm": "DC0_C0_RP0_VM0"}))).await;
    r.wait_deliveries("trigger=power-off&state=succeeded", 20, |l| l.len() == 1)
        .await;
    crate::common::post_ce(&r, "/cmds", cmd("vm.off", json!({"vm": "DC0_C0_RP0_VM1"}))).await;
    let held = r
        .wait_deliveries("trigger=power-off&state=retrying", 20, |l| l.len() == 1)
        .await;
    let why = held[0]["last_error"].as_str().unwrap();
    assert!(
        why.contains("powering off `DC0_C0_RP0_VM1` would leave 2 of the 2 VMs of cluster `DC0_C0` off (100%); at most 50% at once"),
        "{why}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let vm1 = c
        .find_vm(&VmSelector::Name("DC0_C0_RP0_VM1".into()))
        .await
        .unwrap();
    assert_eq!(c.power_state(&vm1).await.unwrap(), "poweredOn");
    let vm0 = c
        .find_vm(&VmSelector::Name("DC0_C0_RP0_VM0".into()))
        .await
        .unwrap();
    c.power(&vm0, PowerOp::On).await.unwrap();
    r.wait_deliveries("trigger=power-off&state=succeeded", 20, |l| l.len() == 2)
        .await;
    assert_eq!(c.power_state(&vm1).await.unwrap(), "poweredOff");
    r.assert_guard_rail("budget", "held").await;
    r.stop().await;
}

/// Guard rail: a paused scope. With cluster `DC0_C0` paused through the API, powering off
/// one of its VMs is held (waiting, the VM read back on) while a VM of a standalone host is
/// powered off as usual; `discard` ends the held change dead without running it (the VM
/// stays on); a later held change runs at once when the pause is lifted. Bad requests get
/// a 400 naming what is wrong.
#[tokio::test]
async fn a_paused_cluster_holds_its_changes_until_lifted_or_discarded() {
    let sim = Simulator::start();
    let c = client(&sim).await;
    std::env::set_var("REFLEX_IT_VC_PASSWORD", "pass");
    let r = Reflex::start(&format!(
        r#"
vcenters:
  vc1: {{url: "{}", username: user, password: "${{env:REFLEX_IT_VC_PASSWORD}}", insecure: true, loop_guard: false}}
sources:
  - {{name: cmds, type: cloudevents, path: /cmds}}
triggers:
  - name: power-off
    filters: [{{exact: {{type: vm.off}}}}]
    action: {{type: vsphere.power, vcenter: vc1, vm: {{name: "{{{{ event.data.vm }}}}"}}, op: "off"}}
"#,
        sim.url
    ))
    .await;
    let pause = |body: serde_json::Value| {
        r.client
            .post(format!("{}/api/v1/pauses", r.api))
            .json(&body)
            .send()
    };
    for (body, says) in [
        (
            json!({"vcenter": "nope", "cluster": "DC0_C0"}),
            "no vCenter `nope`",
        ),
        (json!({"vcenter": "vc1"}), "exactly one of"),
        (
            json!({"vcenter": "vc1", "cluster": "a", "folder": "b"}),
            "exactly one of",
        ),
    ] {
        let resp = pause(body).await.unwrap();
        assert_eq!(resp.status(), 400);
        let text = resp.text().await.unwrap();
        assert!(text.contains(says), "{text}");
    }
    let resp = pause(json!({"vcenter": "vc1", "cluster": "DC0_C0", "reason": "change freeze"}))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let key = resp.json::<serde_json::Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(key, "scope:vc1:cluster:DC0_C0");
    let cmd = |vm: &str| {
        json!({"specversion": "1.0", "id": uuid::Uuid::new_v4().to_string(), "source": "/ops", "type": "vm.off", "datacontenttype": "application/json", "data": {"vm": vm}}).to_string()
    };
    let state = |name: &'static str| {
        let c = &c;
        async move {
            let vm = c.find_vm(&VmSelector::Name(name.into())).await.unwrap();
            c.power_state(&vm).await.unwrap()
        }
    };
    crate::common::post_ce(&r, "/cmds", cmd("DC0_C0_RP0_VM0")).await;
    let held = r
        .wait_deliveries("trigger=power-off&state=retrying", 20, |l| l.len() == 1)
        .await;
    let why = held[0]["last_error"].as_str().unwrap();
    assert!(
        why.contains("held by a pause (scope:vc1:cluster:DC0_C0): it is in cluster `DC0_C0`"),
        "{why}"
    );
    crate::common::post_ce(&r, "/cmds", cmd("DC0_H0_VM0")).await;
    r.wait_deliveries("trigger=power-off&state=succeeded", 20, |l| l.len() == 1)
        .await;
    assert_eq!(state("DC0_H0_VM0").await, "poweredOff");
    assert_eq!(state("DC0_C0_RP0_VM0").await, "poweredOn");
    let list = r.api_get("/api/v1/pauses").await;
    assert_eq!(list["pauses"][0]["key"], key.as_str(), "{list:#}");
    assert_eq!(list["pauses"][0]["reason"], "change freeze", "{list:#}");
    assert_eq!(
        list["pauses"][0]["held"],
        json!([held[0]["id"]]),
        "{list:#}"
    );
    // The console lists it, with what it holds.
    let page = r
        .client
        .get(format!("{}/ui/triggers", r.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("cluster DC0_C0 in vc1"), "{page}");
    assert!(page.contains(&format!("/ui/pauses/{key}/lift")), "{page}");

    // Discarded: it ends dead without running, and can be replayed later.
    let resp = r
        .client
        .post(format!("{}/api/v1/pauses/{key}/discard", r.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let dead = r
        .wait_deliveries("trigger=power-off&state=dead", 20, |l| l.len() == 1)
        .await;
    assert!(
        dead[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("discarded by an operator"),
        "{dead:#?}"
    );
    assert_eq!(state("DC0_C0_RP0_VM0").await, "poweredOn");

    // Lifted: the change it holds runs at once (not at its next look, a minute away).
    crate::common::post_ce(&r, "/cmds", cmd("DC0_C0_RP0_VM1")).await;
    r.wait_deliveries("trigger=power-off&state=retrying", 20, |l| l.len() == 1)
        .await;
    assert_eq!(state("DC0_C0_RP0_VM1").await, "poweredOn");
    // Lifted from the console this time.
    let resp = r
        .client
        .post(format!("{}/ui/pauses/{key}/lift", r.api))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let page = resp.text().await.unwrap();
    assert!(
        page.contains("lifted: the changes it held run now"),
        "{page}"
    );
    r.wait_deliveries("trigger=power-off&state=succeeded", 15, |l| l.len() == 2)
        .await;
    assert_eq!(state("DC0_C0_RP0_VM1").await, "poweredOff");
    assert_eq!(r.api_get("/api/v1/pauses").await["pauses"], json!([]));
    let resp = r
        .client
        .post(format!("{}/api/v1/pauses/{key}/lift", r.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // Paused from the console too: a folder this time, with its reason.
    let form = |body: &'static str| {
        r.client
            .post(format!("{}/ui/pauses", r.api))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    let resp = form("vcenter=vc1&kind=folder&name=vm&reason=patching+window")
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let page = resp.text().await.unwrap();
    assert!(page.contains("folder `vm` of `vc1` paused"), "{page}");
    assert!(page.contains("folder vm in vc1"), "{page}");
    let list = r.api_get("/api/v1/pauses").await;
    assert_eq!(list["pauses"][0]["key"], "scope:vc1:folder:vm", "{list:#}");
    assert_eq!(list["pauses"][0]["reason"], "patching window", "{list:#}");
    // What the API refuses is said on the page, and nothing is paused.
    for (body, says) in [
        ("vcenter=vc9&kind=cluster&name=x", "no vCenter `vc9`"),
        (
            "vcenter=vc1&kind=datastore&name=x",
            "`datastore` is not a scope",
        ),
        (
            "vcenter=vc1&kind=cluster&name=+",
            "must be 1 to 200 characters",
        ),
    ] {
        let page = form(body).await.unwrap().text().await.unwrap();
        assert!(page.contains(says), "{body}: {page}");
    }
    assert_eq!(
        r.api_get("/api/v1/pauses").await["pauses"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    r.assert_guard_rail("pause", "held").await;
    r.stop().await;
}

/// Guard rail: protected objects (by name pattern, by tag, hosts by name) are refused by
/// every changing action, permanently, with the rule named, and left as they are; an
/// unprotected VM is changed as usual.
#[tokio::test]
async fn protected_objects_are_refused_and_left_as_they_are() {
    let sim = Simulator::start();
    let c = client(&sim).await;
    let by_name = c
        .find_vm(&VmSelector::Name("DC0_H0_VM1".into()))
        .await
        .unwrap();
    let by_tag = c
        .find_vm(&VmSelector::Name("DC0_C0_RP0_VM0".into()))
        .await
        .unwrap();
    c.tag(&by_tag, "reflex", "never", false, true)
        .await
        .unwrap();
    for vm in [&by_name, &by_tag] {
        c.set_nics_connected(vm, true, None).await.unwrap();
    }
    let r = Reflex::start(&format!(
        r#"{}    protect: {{names: ["*_H0_VM1"], tags: [reflex/never], hosts: ["DC0_H0"]}}
sources:
  - name: logs
    type: webhook
    path: /hooks/logs
    mapping: {{type: "security.{{{{ body.alert }}}}", subject: "{{{{ body.vm }}}}"}}
triggers:
  - name: quarantine
    filters: [{{exact: {{type: security.compromised}}}}]
    action: {{type: vsphere.disconnect_nics, vcenter: vc1, vm: {{name: "{{{{ event.subject }}}}"}}}}
    delivery: {{max_attempts: 3, backoff: 100ms}}
  - name: maintenance
    filters: [{{exact: {{type: security.maintenance}}}}]
    action: {{type: vsphere.host_maintenance, vcenter: vc1, host: "{{{{ event.subject }}}}", mode: enter}}
"#,
        vcenters(&sim)
    ))
    .await;
    for vm in ["DC0_H0_VM1", "DC0_C0_RP0_VM0", "DC0_H0_VM0"] {
        let resp = r
            .post_json("/hooks/logs", &json!({"alert": "compromised", "vm": vm}))
            .await;
        assert_eq!(resp.status(), 202);
    }
    r.post_json(
        "/hooks/logs",
        &json!({"alert": "maintenance", "vm": "DC0_H0"}),
    )
    .await;
    let dead = r.wait_deliveries("state=dead", 20, |l| l.len() == 3).await;
    for d in &dead {
        assert_eq!(d["attempts"], 1, "refused at once, not retried: {d}");
        let why = d["last_error"].as_str().unwrap();
        assert!(why.contains("refused by a guard rail"), "{why}");
    }
    let reasons: Vec<&str> = dead
        .iter()
        .map(|d| d["last_error"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|w| w.contains("`*_H0_VM1`")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|w| w.contains("tag `reflex/never`")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|w| w.contains("host `DC0_H0` is protected")),
        "{reasons:?}"
    );
    r.wait_deliveries("state=succeeded", 20, |l| l.len() == 1)
        .await;
    assert_eq!(nic_state(&c, "DC0_H0_VM1").await, vec![(true, true)]);
    assert_eq!(nic_state(&c, "DC0_C0_RP0_VM0").await, vec![(true, true)]);
    assert_eq!(nic_state(&c, "DC0_H0_VM0").await, vec![(false, false)]);
    let host = c.find_by_name("HostSystem", "DC0_H0").await.unwrap();
    assert_eq!(
        c.property(&host, "runtime.inMaintenanceMode")
            .await
            .unwrap()
            .map(|n| n.text),
        Some("false".into())
    );
    r.assert_guard_rail("protect", "refused").await;
    r.stop().await;
}

/// Guard rail: dry run. A shadow trigger (`dry_run: true`) on the storage alarm records the
/// datastore it would move the VM to, and the VM stays where it is; a workflow step in dry
/// run records the CPU change it would make, and the VM keeps its CPUs; an `http_request` in
/// a dry-run trigger sends nothing. Each is a succeeded delivery whose record says so.
#[tokio::test]
async fn dry_runs_say_what_they_would_do_and_change_nothing() {
    let sim = Simulator::start();
    let c = client(&sim).await;
    let mut rest = Receiver::start().await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    let before = c.vm_facts(&vm).await.unwrap();
    let r = Reflex::start(&format!(
        r#"{vc}
sources:
  - {{name: vc1-events, type: vcenter, vcenter: vc1, poll_interval: 100ms}}
triggers:
  - name: relief-shadow
    dry_run: true
    filters: [{{exact: {{type: com.vmware.vsphere.AlarmStatusChangedEvent.v0}}}}]
    when: 'event.data.Alarm.Name == "VM Storage Usage" && event.data.To == "red"'
    action: {{type: vsphere.relocate, vcenter: vc1, vm: {{moid: "{{{{ event.data.Vm.Vm.Value }}}}"}}, allowed_datastores: [LocalDS_1]}}
  - name: resize-plan
    filters: [{{exact: {{type: com.vmware.vsphere.AlarmStatusChangedEvent.v0}}}}]
    when: 'event.data.Alarm.Name == "VM CPU Usage"'
    action:
      type: workflow
      steps:
        - name: vm
          action: {{type: vsphere.get_vm, vcenter: vc1, vm: {{moid: "{{{{ event.data.Vm.Vm.Value }}}}"}}}}
        - name: grow
          dry_run: true
          action: {{type: vsphere.reconfigure, vcenter: vc1, vm: {{moid: "{{{{ steps.vm.output.moid }}}}"}}, cpus: "{{{{ steps.vm.output.cpus + 1 }}}}"}}
  - name: notify-shadow
    dry_run: true
    filters: [{{exact: {{type: com.vmware.vsphere.AlarmStatusChangedEvent.v0}}}}]
    action: {{type: http_request, method: PUT, url: "{url}", body: "{{{{ event.data.Alarm.Name }}}}"}}
"#,
        vc = vcenters(&sim),
        url = rest.url()
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    for alarm in ["VM Storage Usage", "VM CPU Usage"] {
        c.post_event(vsphere::events::alarm_status_changed(
            &vm,
            "DC0_H0_VM0",
            alarm,
            "yellow",
            "red",
        ))
        .await
        .unwrap();
    }
    let done = r
        .wait_deliveries("state=succeeded", 20, |l| l.len() == 4)
        .await;
    let detail = |trigger: &str| {
        let d = done.iter().find(|d| d["trigger"] == trigger).unwrap();
        let id = d["id"].clone();
        let r = &r;
        async move {
            r.api_get(&format!("/api/v1/deliveries/{id}")).await["attempt_log"][0]["detail"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let relief = detail("relief-shadow").await;
    assert!(
        relief.starts_with("dry run: would change:")
            && relief.contains("LocalDS_1")
            && relief.contains("RelocateVM_Task"),
        "{relief}"
    );
    let grow = detail("resize-plan").await;
    let cpus = before["cpus"].as_i64().unwrap();
    assert!(
        grow.contains(&format!("CPUs {cpus} -> {}", cpus + 1))
            && grow.contains("dry run: would change"),
        "{grow}"
    );
    let notify = detail("notify-shadow").await;
    assert!(notify.starts_with("dry run: would PUT"), "{notify}");
    rest.nothing_for(300).await;
    // Nothing changed: the VM's datastores and CPUs read back as before.
    let after = c.vm_facts(&vm).await.unwrap();
    assert_eq!(after["datastores"], before["datastores"]);
    assert_eq!(after["cpus"], before["cpus"]);
    r.assert_guard_rail("dry_run", "planned").await;
    r.stop().await;
}

/// Guard rail: verification. A change whose goal holds afterwards succeeds; one whose goal
/// does not hold within its timeout fails verification (permanently), and in a workflow its
/// `on_failure` steps run with that error.
#[tokio::test]
async fn a_change_is_verified_against_the_vms_facts() {
    let sim = Simulator::start();
    let c = client(&sim).await;
    let mut told = Receiver::start().await;
    let r = Reflex::start(&format!(
        r#"{vc}
sources:
  - {{name: ops, type: webhook, path: /ops, mapping: {{type: "ops.{{{{ body.op }}}}", subject: "{{{{ body.vm }}}}"}}}}
triggers:
  - name: grow
    filters: [{{exact: {{type: ops.grow}}}}]
    action:
      type: vsphere.reconfigure
      vcenter: vc1
      vm: {{name: "{{{{ event.subject }}}}"}}
      cpus: "2"
      verify: {{condition: "vm.cpus == 2", timeout: 5s}}
  - name: impossible
    filters: [{{exact: {{type: ops.impossible}}}}]
    action:
      type: workflow
      steps:
        - name: grow
          action:
            type: vsphere.reconfigure
            vcenter: vc1
            vm: {{name: "{{{{ event.subject }}}}"}}
            cpus: "3"
            verify: {{condition: "vm.cpus == 99", timeout: 1s}}
      on_failure:
        - name: tell
          action: {{type: http_request, url: "{url}", body: "{{{{ steps.grow.error }}}}"}}
"#,
        vc = vcenters(&sim),
        url = told.url()
    ))
    .await;
    r.post_json("/ops", &json!({"op": "grow", "vm": "DC0_H0_VM0"}))
        .await;
    r.wait_deliveries("trigger=grow&state=succeeded", 20, |l| l.len() == 1)
        .await;
    r.post_json("/ops", &json!({"op": "impossible", "vm": "DC0_H0_VM1"}))
        .await;
    let got = told.next(20).await;
    let body = String::from_utf8_lossy(&got.body).to_string();
    assert!(
        body.contains("failed verification") && body.contains("vm.cpus == 99"),
        "{body}"
    );
    let dead = r
        .wait_deliveries("trigger=impossible&state=dead", 20, |l| l.len() == 1)
        .await;
    assert_eq!(
        dead[0]["attempts"], 1,
        "a failed verification is not retried"
    );
    let vm1 = c
        .find_vm(&VmSelector::Name("DC0_H0_VM1".into()))
        .await
        .unwrap();
    assert_eq!(
        c.vm_facts(&vm1).await.unwrap()["cpus"],
        3,
        "the change was made; its goal was not met"
    );
    r.assert_guard_rail("verify", "failed").await;
    r.stop().await;
}

/// Loop guard: vCenter events caused by reflex's own session (its user) carry
/// `reflexcaused`, and triggers do not fire on them unless they set `own_effects: true`.
/// Two triggers that would flip a VM on and off forever stop after one flip; an audit
/// trigger with `own_effects` still sees reflex's change, and the operator's own power-off
/// is acted on as usual.
#[tokio::test]
async fn reflex_does_not_fire_on_its_own_vcenter_changes() {
    let sim = Simulator::start_with(&["-any-login"]);
    let c = client(&sim).await; // logs in as `user`
    let mut audit = Receiver::start().await;
    std::env::set_var("REFLEX_IT_VC_PASSWORD", "pass");
    let r = Reflex::start(&format!(
        r#"
vcenters:
  vc1: {{url: "{url}", username: reflex-svc, password: "${{env:REFLEX_IT_VC_PASSWORD}}", insecure: true}}
sources:
  - {{name: vc1-events, type: vcenter, vcenter: vc1, poll_interval: 100ms}}
triggers:
  - name: flop
    filters: [{{exact: {{type: com.vmware.vsphere.VmPoweredOffEvent.v0}}}}]
    action: {{type: vsphere.power, vcenter: vc1, op: "on", vm: {{moid: "{{{{ event.data.Vm.Vm.Value }}}}"}}}}
  - name: flip
    filters: [{{exact: {{type: com.vmware.vsphere.VmPoweredOnEvent.v0}}}}]
    action: {{type: vsphere.power, vcenter: vc1, op: "off", vm: {{moid: "{{{{ event.data.Vm.Vm.Value }}}}"}}}}
  - name: audit
    own_effects: true
    filters: [{{exact: {{type: com.vmware.vsphere.VmPoweredOnEvent.v0}}}}]
    action: {{type: http, url: "{audit}"}}
"#,
        url = sim.url,
        audit = audit.url()
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    c.power(&vm, PowerOp::Off).await.unwrap();
    // flop powers it back on (as reflex-svc); that VmPoweredOnEvent is reflex's own effect.
    r.wait_deliveries("trigger=flop&state=succeeded", 20, |l| l.len() == 1)
        .await;
    let seen = audit.next(20).await;
    let ev: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(ev["UserName"], "reflex-svc", "{ev}");
    assert_eq!(seen.headers["ce-reflexcaused"], "true");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let flips = r.api_get("/api/v1/deliveries?trigger=flip").await;
    assert_eq!(flips["deliveries"].as_array().unwrap().len(), 0, "{flips}");
    assert_eq!(c.power_state(&vm).await.unwrap(), "poweredOn");
    let flops = r.api_get("/api/v1/deliveries?trigger=flop").await;
    assert_eq!(flops["deliveries"].as_array().unwrap().len(), 1, "{flops}");
    r.assert_guard_rail("loop_guard", "skipped").await;
    r.stop().await;
}
