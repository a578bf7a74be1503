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
        "vcenters:\n  vc1:\n    url: {}\n    username: user\n    password: ${{env:REFLEX_IT_VC_PASSWORD}}\n    insecure: true\n",
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
  vc1: {{url: "{}", username: user, password: "${{env:REFLEX_IT_VC_PASSWORD}}", insecure: true}}
  vc2: {{url: "{}", username: user, password: "${{env:REFLEX_IT_VC_PASSWORD}}", insecure: true}}
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
