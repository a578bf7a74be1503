//! The client against govmomi's vCenter simulator: every effect is read back.

use std::time::Duration;
use vsphere::sim::Simulator;
use vsphere::vm::{Change, PowerOp, VmSelector};
use vsphere::{Client, ConnectOptions, Error, Node};

fn opts(sim: &Simulator, password: &str) -> ConnectOptions {
    ConnectOptions {
        url: sim.url.clone(),
        username: "user".into(),
        password: password.into(),
        insecure: true,
        ca_pem: None,
        thumbprint: None,
        timeout: Duration::from_secs(30),
    }
}

async fn connect(sim: &Simulator) -> Client {
    Client::connect(opts(sim, "pass")).await.expect("login")
}

#[tokio::test]
async fn login_faults_and_tls_verification() {
    let sim = Simulator::start();
    let e = Client::connect(opts(&sim, "wrong"))
        .await
        .err()
        .expect("a wrong password must fail");
    assert_eq!(e.fault_name(), Some("InvalidLogin"), "{e}");
    assert!(!e.is_transient());
    // Verification is on by default: the simulator's self-signed certificate is refused.
    let mut o = opts(&sim, "pass");
    o.insecure = false;
    let e = Client::connect(o)
        .await
        .err()
        .expect("an untrusted certificate must fail");
    assert!(matches!(e, Error::Connection(_)), "{e}");
    let c = connect(&sim).await;
    assert!(!c.content.instance_uuid.is_empty());
    // A thumbprint pin trusts exactly that certificate, without `insecure`.
    let mut o = opts(&sim, "pass");
    o.insecure = false;
    o.thumbprint = Some(sim.thumbprint.clone());
    Client::connect(o)
        .await
        .expect("the pinned certificate is trusted");
    let mut o = opts(&sim, "pass");
    o.insecure = false;
    o.thumbprint = Some("00:".repeat(19) + "00");
    let e = Client::connect(o)
        .await
        .err()
        .expect("another thumbprint must fail");
    assert!(e.to_string().contains("thumbprint"), "{e}");
}

#[tokio::test]
async fn find_vms_every_way() {
    let sim = Simulator::start();
    let c = connect(&sim).await;
    let by_name = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    assert_eq!(by_name.kind, "VirtualMachine");
    let by_moid = c
        .find_vm(&VmSelector::Moid(by_name.value.clone()))
        .await
        .unwrap();
    assert_eq!(by_moid, by_name);
    let uuid = c
        .property(&by_name, "config.instanceUuid")
        .await
        .unwrap()
        .unwrap()
        .text;
    assert_eq!(
        c.find_vm(&VmSelector::InstanceUuid(uuid)).await.unwrap(),
        by_name
    );
    for missing in [
        VmSelector::Name("nope".into()),
        VmSelector::Moid("vm-99999".into()),
        VmSelector::InstanceUuid("00000000-0000-0000-0000-000000000000".into()),
    ] {
        let e = c.find_vm(&missing).await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{missing}: {e}");
    }
}

/// Sets a VM's guest host name the simulator's way (an `extraConfig` key it applies).
async fn set_host_name(c: &Client, vm: &vsphere::MoRef, name: &str) {
    let spec = Node::new("spec").with(
        Node::new("extraConfig")
            .typed("OptionValue")
            .with(Node::text("key", "SET.guest.hostName"))
            .with(Node::text("value", name).typed("xsd:string")),
    );
    c.run_task("ReconfigVM_Task", vm, vec![spec], Duration::from_secs(30))
        .await
        .unwrap();
}

/// A DNS name or a name that several VMs share is refused with the candidates named,
/// never answered with the first of them.
#[tokio::test]
async fn ambiguous_lookups_name_the_candidates() {
    let sim = Simulator::start();
    let c = connect(&sim).await;
    let cc = &c;
    let vm = |n: &'static str| async move { cc.find_vm(&VmSelector::Name(n.into())).await };
    let (a, b, d) = (
        vm("DC0_H0_VM0").await.unwrap(),
        vm("DC0_H0_VM1").await.unwrap(),
        vm("DC0_C0_RP0_VM0").await.unwrap(),
    );
    set_host_name(&c, &a, "dup.example").await;
    set_host_name(&c, &b, "dup.example").await;
    set_host_name(&c, &d, "one.example").await;
    assert_eq!(
        c.find_vm(&VmSelector::DnsName("one.example".into()))
            .await
            .unwrap(),
        d
    );
    let e = c
        .find_vm(&VmSelector::DnsName("dup.example".into()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("2 VMs have the DNS name `dup.example`"),
        "{msg}"
    );
    assert!(msg.contains(&a.value) && msg.contains(&b.value), "{msg}");
    assert!(
        msg.contains("DC0_H0_VM0") && msg.contains("DC0_H0_VM1"),
        "{msg}"
    );
    let e = c
        .find_vm(&VmSelector::DnsName("none.example".into()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
}

async fn nic_state(c: &Client, vm: &vsphere::MoRef) -> Vec<(bool, bool)> {
    c.nic_connection(vm)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, conn, start)| (conn, start))
        .collect()
}

#[tokio::test]
async fn nics_disconnect_and_connect_idempotently() {
    let sim = Simulator::start();
    let c = connect(&sim).await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    // Model VMs start with connected=false: connect first, so that disconnecting is visible.
    assert!(matches!(
        c.set_nics_connected(&vm, true, None).await.unwrap(),
        Change::Changed(_)
    ));
    assert_eq!(nic_state(&c, &vm).await, vec![(true, true)]);
    let change = c.set_nics_connected(&vm, false, None).await.unwrap();
    assert!(matches!(change, Change::Changed(_)), "{change}");
    assert_eq!(nic_state(&c, &vm).await, vec![(false, false)]);
    // The rest of the NIC is intact (MAC, backing).
    let nic = &c.nics(&vm).await.unwrap()[0];
    assert!(nic.child_text("macAddress").is_some_and(|m| !m.is_empty()));
    assert!(nic.child("backing").is_some());
    // Second run: nothing to do.
    assert!(matches!(
        c.set_nics_connected(&vm, false, None).await.unwrap(),
        Change::AlreadySo(_)
    ));
    // A NIC key that does not exist is an error, not a silent success.
    let e = c
        .set_nics_connected(&vm, true, Some(&[9999]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
}

#[tokio::test]
async fn power_and_reconfigure() {
    let sim = Simulator::start();
    let c = connect(&sim).await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM1".into()))
        .await
        .unwrap();
    assert_eq!(c.power_state(&vm).await.unwrap(), "poweredOn");
    assert!(matches!(
        c.power(&vm, PowerOp::Off).await.unwrap(),
        Change::Changed(_)
    ));
    assert_eq!(c.power_state(&vm).await.unwrap(), "poweredOff");
    assert!(matches!(
        c.power(&vm, PowerOp::Off).await.unwrap(),
        Change::AlreadySo(_)
    ));
    // Reset of a powered-off VM: a task error with the fault's name.
    let e = c.power(&vm, PowerOp::Reset).await.unwrap_err();
    assert_eq!(e.fault_name(), Some("InvalidPowerState"), "{e}");
    assert!(matches!(
        c.power(&vm, PowerOp::On).await.unwrap(),
        Change::Changed(_)
    ));
    assert!(matches!(
        c.power(&vm, PowerOp::Suspend).await.unwrap(),
        Change::Changed(_)
    ));
    assert_eq!(c.power_state(&vm).await.unwrap(), "suspended");

    let change = c.reconfigure(&vm, Some(3), Some(3072)).await.unwrap();
    assert!(matches!(change, Change::Changed(_)), "{change}");
    let props = c
        .properties(&vm, &["config.hardware.numCPU", "config.hardware.memoryMB"])
        .await
        .unwrap();
    let texts: Vec<&str> = props.iter().map(|(_, v)| v.text.as_str()).collect();
    assert!(texts.contains(&"3") && texts.contains(&"3072"), "{texts:?}");
    assert!(matches!(
        c.reconfigure(&vm, Some(3), Some(3072)).await.unwrap(),
        Change::AlreadySo(_)
    ));
}

#[tokio::test]
async fn expired_sessions_log_in_again_once() {
    let sim = Simulator::start();
    let c = connect(&sim).await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    c.drop_session_for_test().await;
    // RetrievePropertiesEx reports the dead session in missingSet (HTTP 200).
    assert_eq!(c.power_state(&vm).await.unwrap(), "poweredOn");
    assert_eq!(c.relogins().await, 1);
    c.drop_session_for_test().await;
    // A method call reports it as a NotAuthenticated fault.
    c.find_vm(&VmSelector::InstanceUuid(
        "00000000-0000-0000-0000-000000000000".into(),
    ))
    .await
    .unwrap_err();
    assert_eq!(c.relogins().await, 2);
}

#[tokio::test]
async fn events_appear_in_latest_page_and_posted_alarms_convert() {
    let sim = Simulator::start();
    let c = connect(&sim).await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    let collector = c
        .create_event_collector(vsphere::events::MAX_COUNT)
        .await
        .unwrap();
    let before = c.latest_page(&collector).await.unwrap();
    let max_before = before
        .iter()
        .filter_map(vsphere::events::key)
        .max()
        .unwrap_or(0);
    c.power(&vm, PowerOp::Off).await.unwrap();
    let alarm =
        vsphere::events::alarm_status_changed(&vm, "DC0_H0_VM0", "VM CPU Usage", "yellow", "red");
    c.post_event(alarm).await.unwrap();
    let page = c.latest_page(&collector).await.unwrap();
    let new: Vec<&Node> = page
        .iter()
        .filter(|e| vsphere::events::key(e).unwrap_or(0) > max_before)
        .collect();
    let classes: Vec<String> = new.iter().map(|e| vsphere::events::class(e)).collect();
    assert!(
        classes.contains(&"VmPoweredOffEvent".to_string()),
        "{classes:?}"
    );
    let alarm = new
        .iter()
        .find(|e| vsphere::events::class(e) == "AlarmStatusChangedEvent")
        .expect("posted alarm");
    let j = vsphere::events::event_data(alarm);
    assert_eq!(j["Alarm"]["Name"], "VM CPU Usage");
    assert_eq!(j["To"], "red");
    assert_eq!(j["Vm"]["Vm"]["Value"], vm.value.as_str());
    let off = new
        .iter()
        .find(|e| vsphere::events::class(e) == "VmPoweredOffEvent")
        .unwrap();
    let j = vsphere::events::event_data(off);
    assert_eq!(j["Vm"]["Name"], "DC0_H0_VM0");
    assert!(j["FullFormattedMessage"]
        .as_str()
        .unwrap()
        .contains("powered off"));
    c.destroy_collector(&collector).await;
}

#[tokio::test]
async fn tags_attach_replace_and_detach() {
    let sim = Simulator::start();
    let c = connect(&sim).await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    // Missing category/tag without `create`: a clear error.
    let e = c.tag(&vm, "size", "large", true, false).await.unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    assert!(matches!(
        c.tag(&vm, "size", "medium", true, true).await.unwrap(),
        Change::Changed(_)
    ));
    assert_eq!(c.tag_names(&vm, "size").await.unwrap(), vec!["medium"]);
    assert!(matches!(
        c.tag(&vm, "size", "medium", true, true).await.unwrap(),
        Change::AlreadySo(_)
    ));
    // Replace within the category: medium goes, large comes.
    assert!(matches!(
        c.tag(&vm, "size", "large", true, true).await.unwrap(),
        Change::Changed(_)
    ));
    assert_eq!(c.tag_names(&vm, "size").await.unwrap(), vec!["large"]);
    assert!(matches!(
        c.untag(&vm, "size", "large").await.unwrap(),
        Change::Changed(_)
    ));
    assert!(c.tag_names(&vm, "size").await.unwrap().is_empty());
    assert!(matches!(
        c.untag(&vm, "size", "large").await.unwrap(),
        Change::AlreadySo(_)
    ));
}

#[tokio::test]
async fn relocate_host_maintenance_delete_and_clone() {
    use vsphere::vm::{CloneSpec, DatastoreChoice};
    let sim = Simulator::start();
    let c = connect(&sim).await;
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    assert_eq!(ds_names(&c, &vm).await, vec!["LocalDS_0"]);
    assert!(matches!(
        c.relocate(&vm, &DatastoreChoice::Named("LocalDS_1".into()))
            .await
            .unwrap(),
        Change::Changed(_)
    ));
    assert_eq!(ds_names(&c, &vm).await, vec!["LocalDS_1"]);
    assert!(matches!(
        c.relocate(&vm, &DatastoreChoice::Named("LocalDS_1".into()))
            .await
            .unwrap(),
        Change::AlreadySo(_)
    ));
    // Most free space among allowed ones: with one allowed, it is that one.
    assert!(matches!(
        c.relocate(&vm, &DatastoreChoice::MostFree(vec!["LocalDS_0".into()]))
            .await
            .unwrap(),
        Change::Changed(_)
    ));
    assert_eq!(ds_names(&c, &vm).await, vec!["LocalDS_0"]);
    let e = c
        .relocate(&vm, &DatastoreChoice::MostFree(vec!["nope".into()]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");

    assert!(matches!(
        c.host_maintenance("DC0_H0", true).await.unwrap(),
        Change::Changed(_)
    ));
    let host = c.find_by_name("HostSystem", "DC0_H0").await.unwrap();
    assert_eq!(
        c.property(&host, "runtime.inMaintenanceMode")
            .await
            .unwrap()
            .unwrap()
            .text,
        "true"
    );
    assert!(matches!(
        c.host_maintenance("DC0_H0", true).await.unwrap(),
        Change::AlreadySo(_)
    ));
    assert!(matches!(
        c.host_maintenance("DC0_H0", false).await.unwrap(),
        Change::Changed(_)
    ));

    // Clone from a VM, then make a template of the clone and clone from it.
    let spec = CloneSpec {
        name: "web-clone".into(),
        ..Default::default()
    };
    assert!(matches!(
        c.clone_vm(&VmSelector::Name("DC0_H0_VM0".into()), &spec)
            .await
            .unwrap(),
        Change::Changed(_)
    ));
    let clone = c
        .find_vm(&VmSelector::Name("web-clone".into()))
        .await
        .unwrap();
    assert_eq!(c.power_state(&clone).await.unwrap(), "poweredOff");
    assert!(matches!(
        c.clone_vm(&VmSelector::Name("DC0_H0_VM0".into()), &spec)
            .await
            .unwrap(),
        Change::AlreadySo(_)
    ));
    c.call("MarkAsTemplate", &clone, vec![]).await.unwrap();
    let spec = CloneSpec {
        name: "from-template".into(),
        power_on: true,
        ..Default::default()
    };
    c.clone_vm(&VmSelector::Name("web-clone".into()), &spec)
        .await
        .unwrap();
    let t = c
        .find_vm(&VmSelector::Name("from-template".into()))
        .await
        .unwrap();
    assert_eq!(c.power_state(&t).await.unwrap(), "poweredOn");

    // Delete: refused while powered on unless asked to power off; then gone; then "already so".
    let e = c
        .delete_vm(&VmSelector::Name("from-template".into()), false)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    assert!(matches!(
        c.delete_vm(&VmSelector::Name("from-template".into()), true)
            .await
            .unwrap(),
        Change::Changed(_)
    ));
    assert!(matches!(
        c.find_vm(&VmSelector::Name("from-template".into()))
            .await
            .unwrap_err(),
        Error::NotFound(_)
    ));
    assert!(matches!(
        c.delete_vm(&VmSelector::Name("from-template".into()), true)
            .await
            .unwrap(),
        Change::AlreadySo(_)
    ));
}

async fn ds_names(c: &Client, vm: &vsphere::MoRef) -> Vec<String> {
    let refs = c.property(vm, "datastore").await.unwrap().unwrap();
    let mut names = Vec::new();
    for r in refs.children {
        let ds = vsphere::MoRef::from_node(&r).unwrap();
        names.push(c.property(&ds, "name").await.unwrap().unwrap().text);
    }
    names
}

#[tokio::test]
async fn create_vm_once() {
    use vsphere::vm::CreateSpec;
    let sim = Simulator::start();
    let c = connect(&sim).await;
    let spec = CreateSpec {
        name: "fresh-1".into(),
        folder: None,
        resource_pool: None,
        datastore: None,
        cpus: 2,
        memory_mb: 2048,
        guest_id: "otherGuest64".into(),
    };
    assert!(matches!(
        c.create_vm(&spec).await.unwrap(),
        Change::Changed(_)
    ));
    let vm = c
        .find_vm(&VmSelector::Name("fresh-1".into()))
        .await
        .unwrap();
    assert_eq!(c.power_state(&vm).await.unwrap(), "poweredOff");
    assert_eq!(
        c.property(&vm, "config.hardware.numCPU")
            .await
            .unwrap()
            .unwrap()
            .text,
        "2"
    );
    assert_eq!(
        c.property(&vm, "config.hardware.memoryMB")
            .await
            .unwrap()
            .unwrap()
            .text,
        "2048"
    );
    assert!(matches!(
        c.create_vm(&spec).await.unwrap(),
        Change::AlreadySo(_)
    ));
}

#[tokio::test]
async fn a_ca_bundle_makes_the_certificate_trusted() {
    let dir = std::env::temp_dir().join(format!("vcsim-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    let arg = format!("-cert-out={}", ca.display());
    let sim = Simulator::start_with(&[&arg]);
    let mut o = opts(&sim, "pass");
    o.insecure = false;
    o.ca_pem = Some(std::fs::read(&ca).unwrap());
    Client::connect(o)
        .await
        .expect("verified against the CA bundle");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A watch on an event collector's `latestPage` wakes when an event happens, not at the
/// end of its wait; with nothing happening it waits its time out.
#[tokio::test]
async fn a_watch_wakes_on_a_new_event() {
    let sim = Simulator::start();
    let c = std::sync::Arc::new(connect(&sim).await);
    let collector = c.create_event_collector(1000).await.unwrap();
    let mut w = c.watch(&collector, &["latestPage"]).await.unwrap();
    // The first answer is the current value.
    assert!(c
        .wait_for_change(&mut w, Duration::from_secs(5))
        .await
        .unwrap());
    let started = std::time::Instant::now();
    assert!(!c
        .wait_for_change(&mut w, Duration::from_secs(1))
        .await
        .unwrap());
    assert!(started.elapsed() >= Duration::from_millis(900));
    let vm = c
        .find_vm(&VmSelector::Name("DC0_H0_VM0".into()))
        .await
        .unwrap();
    let c2 = c.clone();
    let power = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c2.power(&vm, PowerOp::Off).await.unwrap();
    });
    let started = std::time::Instant::now();
    assert!(c
        .wait_for_change(&mut w, Duration::from_secs(20))
        .await
        .unwrap());
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "woke after {waited:?}");
    power.await.unwrap();
    let page = c.latest_page(&collector).await.unwrap();
    assert!(
        page.iter()
            .any(|e| vsphere::events::class(e) == "VmPoweredOffEvent"),
        "the new event is in the page"
    );
    c.unwatch(w).await;
}
