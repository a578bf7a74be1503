//! Virtual machine and host operations. Each reads the current state first and acts only
//! when the goal does not hold yet, reporting what it changed.

use crate::client::{Client, MoRef};
use crate::xml::Node;
use crate::Error;
use std::time::Duration;

/// How a VM is named in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmSelector {
    /// Inventory name (must be unique).
    Name(String),
    /// Managed object id, e.g. `vm-57`.
    Moid(String),
    /// `config.instanceUuid`.
    InstanceUuid(String),
    /// Guest DNS name (VMware Tools).
    DnsName(String),
}

impl std::fmt::Display for VmSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmSelector::Name(n) => write!(f, "VM named `{n}`"),
            VmSelector::Moid(n) => write!(f, "VM {n}"),
            VmSelector::InstanceUuid(n) => write!(f, "VM with instance UUID {n}"),
            VmSelector::DnsName(n) => write!(f, "VM with DNS name `{n}`"),
        }
    }
}

/// What an idempotent operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The goal already held; nothing was done.
    AlreadySo(String),
    /// Something was changed.
    Changed(String),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::AlreadySo(s) => write!(f, "already so: {s}"),
            Change::Changed(s) => write!(f, "changed: {s}"),
        }
    }
}

/// A power operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerOp {
    /// Power on.
    On,
    /// Power off (hard).
    Off,
    /// Reset.
    Reset,
    /// Suspend.
    Suspend,
    /// Shut the guest down (VMware Tools).
    ShutdownGuest,
    /// Reboot the guest (VMware Tools).
    RebootGuest,
}

/// Time allowed for a task.
pub const TASK_TIMEOUT: Duration = Duration::from_secs(600);

const NIC_TYPES: &[&str] = &[
    "VirtualE1000",
    "VirtualE1000e",
    "VirtualVmxnet",
    "VirtualVmxnet2",
    "VirtualVmxnet3",
    "VirtualVmxnet3Vrdma",
    "VirtualPCNet32",
    "VirtualSriovEthernetCard",
];

/// Whether a device (from `config.hardware.device`) is a network adapter.
pub fn is_nic(d: &Node) -> bool {
    d.xsi_type
        .as_deref()
        .is_some_and(|t| NIC_TYPES.contains(&t))
        || (d.child("macAddress").is_some() && d.child("connectable").is_some())
}

/// The moids of `refs`, for an error that names the candidates.
fn moids(refs: &[MoRef]) -> String {
    refs.iter()
        .map(|r| r.value.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn vm(moid: &str) -> MoRef {
    MoRef::new("VirtualMachine", moid)
}

impl Client {
    /// Finds a VM; errors with [`Error::NotFound`] when it does not exist and
    /// [`Error::Invalid`] when a name matches several VMs.
    pub async fn find_vm(&self, sel: &VmSelector) -> Result<MoRef, Error> {
        match sel {
            VmSelector::Moid(id) => {
                let r = vm(id);
                match self.property(&r, "name").await {
                    Ok(Some(_)) => Ok(r),
                    Ok(None) | Err(Error::NotFound(_)) => Err(Error::NotFound(sel.to_string())),
                    Err(Error::Fault { name, .. }) if name == "ManagedObjectNotFound" => {
                        Err(Error::NotFound(sel.to_string()))
                    }
                    Err(e) => Err(e),
                }
            }
            VmSelector::Name(name) => {
                let all = self.list("VirtualMachine", &["name"]).await?;
                let hits: Vec<MoRef> = all
                    .into_iter()
                    .filter(|(_, props)| props.iter().any(|(k, v)| k == "name" && v.text == *name))
                    .map(|(m, _)| m)
                    .collect();
                match hits.len() {
                    0 => Err(Error::NotFound(sel.to_string())),
                    1 => Ok(hits.into_iter().next().expect("one")),
                    n => Err(Error::Invalid(format!(
                        "{n} VMs are named `{name}` ({}); select it by moid or instance UUID",
                        moids(&hits)
                    ))),
                }
            }
            VmSelector::InstanceUuid(uuid) => {
                let r = self
                    .call(
                        "FindByUuid",
                        &self.content.search_index,
                        vec![
                            Node::text("uuid", uuid),
                            Node::text("vmSearch", "true"),
                            Node::text("instanceUuid", "true"),
                        ],
                    )
                    .await?;
                r.child("returnval")
                    .and_then(MoRef::from_node)
                    .ok_or_else(|| Error::NotFound(sel.to_string()))
            }
            VmSelector::DnsName(dns) => {
                // All of them: the first of several would be a guess, and a guess here is
                // the wrong VM's NICs disconnected.
                let r = self
                    .call(
                        "FindAllByDnsName",
                        &self.content.search_index,
                        vec![Node::text("dnsName", dns), Node::text("vmSearch", "true")],
                    )
                    .await?;
                let hits: Vec<MoRef> = r
                    .children_named("returnval")
                    .filter_map(MoRef::from_node)
                    .collect();
                match hits.len() {
                    0 => Err(Error::NotFound(sel.to_string())),
                    1 => Ok(hits.into_iter().next().expect("one")),
                    n => {
                        let mut named = Vec::with_capacity(n);
                        for vm in &hits {
                            let name = self.property(vm, "name").await.ok().flatten();
                            named.push(match name {
                                Some(n) => format!("{vm} `{}`", n.text),
                                None => vm.to_string(),
                            });
                        }
                        Err(Error::Invalid(format!(
                            "{n} VMs have the DNS name `{dns}` ({}); select it by moid or instance UUID",
                            named.join(", ")
                        )))
                    }
                }
            }
        }
    }

    /// The VM's network adapters as full device objects.
    pub async fn nics(&self, vm: &MoRef) -> Result<Vec<Node>, Error> {
        let devices = self
            .property(vm, "config.hardware.device")
            .await?
            .unwrap_or_default();
        Ok(devices.children.into_iter().filter(is_nic).collect())
    }

    /// Each NIC's (key, connected, startConnected).
    pub async fn nic_connection(&self, vm: &MoRef) -> Result<Vec<(i64, bool, bool)>, Error> {
        Ok(self
            .nics(vm)
            .await?
            .iter()
            .map(|n| {
                let flag = |f: &str| {
                    n.path(&["connectable", f])
                        .is_some_and(|v| v.text == "true")
                };
                let key = n
                    .child_text("key")
                    .and_then(|k| k.parse().ok())
                    .unwrap_or(-1);
                (key, flag("connected"), flag("startConnected"))
            })
            .collect())
    }

    /// Sets `connected` and `startConnected` of the VM's NICs (all, or those whose key is in
    /// `keys`). Each NIC is sent back whole, as read, with only `connectable` changed.
    pub async fn set_nics_connected(
        &self,
        vm: &MoRef,
        connected: bool,
        keys: Option<&[i64]>,
    ) -> Result<Change, Error> {
        let want = if connected { "true" } else { "false" };
        let nics = self.nics(vm).await?;
        if let Some(ks) = keys {
            let found: Vec<i64> = nics
                .iter()
                .filter_map(|n| n.child_text("key").and_then(|k| k.parse().ok()))
                .collect();
            if let Some(missing) = ks.iter().find(|k| !found.contains(k)) {
                return Err(Error::NotFound(format!(
                    "network adapter with key {missing} on {vm}"
                )));
            }
        }
        if nics.is_empty() {
            return Ok(Change::AlreadySo(format!("{vm} has no network adapter")));
        }
        let mut spec = Node::new("spec");
        let mut changed = Vec::new();
        for mut nic in nics {
            let key: i64 = nic
                .child_text("key")
                .and_then(|k| k.parse().ok())
                .unwrap_or(-1);
            if keys.is_some_and(|ks| !ks.contains(&key)) {
                continue;
            }
            let conn = nic.child("connectable");
            let is = |f: &str| conn.and_then(|c| c.child_text(f)) == Some(want);
            if is("connected") && is("startConnected") {
                continue;
            }
            let c = match nic.child_mut("connectable") {
                Some(c) => c,
                None => {
                    nic.children
                        .push(Node::new("connectable").typed("VirtualDeviceConnectInfo"));
                    nic.children.last_mut().expect("just pushed")
                }
            };
            c.set_child_text("startConnected", want);
            c.set_child_text("connected", want);
            // `status` is read-only; vCenter recomputes it.
            c.children.retain(|n| n.name != "status");
            changed.push(key);
            spec = spec.with(
                Node::new("deviceChange")
                    .with(Node::text("operation", "edit"))
                    .with(Node {
                        name: "device".into(),
                        ..nic
                    }),
            );
        }
        if changed.is_empty() {
            return Ok(Change::AlreadySo(format!(
                "every selected NIC of {vm} is connected={want}, startConnected={want}"
            )));
        }
        self.run_task("ReconfigVM_Task", vm, vec![spec], TASK_TIMEOUT)
            .await?;
        Ok(Change::Changed(format!(
            "NICs {changed:?} of {vm} set to connected={want}, startConnected={want}"
        )))
    }

    /// `runtime.powerState`: `poweredOn`, `poweredOff` or `suspended`.
    pub async fn power_state(&self, vm: &MoRef) -> Result<String, Error> {
        Ok(self
            .property(vm, "runtime.powerState")
            .await?
            .map(|n| n.text)
            .unwrap_or_default())
    }

    /// Applies a power operation unless the VM is already in the target state.
    pub async fn power(&self, vm: &MoRef, op: PowerOp) -> Result<Change, Error> {
        let state = self.power_state(vm).await?;
        let already = match op {
            PowerOp::On => state == "poweredOn",
            PowerOp::Off | PowerOp::ShutdownGuest => state == "poweredOff",
            PowerOp::Suspend => state == "suspended",
            PowerOp::Reset | PowerOp::RebootGuest => false,
        };
        if already {
            return Ok(Change::AlreadySo(format!("{vm} is {state}")));
        }
        match op {
            PowerOp::On => {
                self.run_task("PowerOnVM_Task", vm, vec![], TASK_TIMEOUT)
                    .await?
            }
            PowerOp::Off => {
                self.run_task("PowerOffVM_Task", vm, vec![], TASK_TIMEOUT)
                    .await?
            }
            PowerOp::Reset => {
                self.run_task("ResetVM_Task", vm, vec![], TASK_TIMEOUT)
                    .await?
            }
            PowerOp::Suspend => {
                self.run_task("SuspendVM_Task", vm, vec![], TASK_TIMEOUT)
                    .await?
            }
            PowerOp::ShutdownGuest | PowerOp::RebootGuest
                if crate::journal::TaskJournal::is_planning() =>
            {
                crate::journal::TaskJournal::plan(format!("{op:?} on {vm}"));
                None
            }
            PowerOp::ShutdownGuest => self.call("ShutdownGuest", vm, vec![]).await.map(|_| None)?,
            PowerOp::RebootGuest => self.call("RebootGuest", vm, vec![]).await.map(|_| None)?,
        };
        Ok(Change::Changed(format!("{vm}: {op:?} (was {state})")))
    }

    /// Sets CPU count and/or memory. The spec carries the `changeVersion` read before, so a
    /// concurrent change makes vCenter refuse (`ConcurrentAccess`) instead of overwriting.
    pub async fn reconfigure(
        &self,
        vm: &MoRef,
        cpus: Option<i64>,
        memory_mb: Option<i64>,
    ) -> Result<Change, Error> {
        let props = self
            .properties(
                vm,
                &[
                    "config.hardware.numCPU",
                    "config.hardware.memoryMB",
                    "config.changeVersion",
                ],
            )
            .await?;
        let get = |k: &str| {
            props
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.text.clone())
        };
        let cur_cpu: Option<i64> = get("config.hardware.numCPU").and_then(|v| v.parse().ok());
        let cur_mem: Option<i64> = get("config.hardware.memoryMB").and_then(|v| v.parse().ok());
        let need_cpu = cpus.filter(|c| Some(*c) != cur_cpu);
        let need_mem = memory_mb.filter(|m| Some(*m) != cur_mem);
        if need_cpu.is_none() && need_mem.is_none() {
            return Ok(Change::AlreadySo(format!(
                "{vm} has {cur_cpu:?} CPUs and {cur_mem:?} MB"
            )));
        }
        let mut spec = Node::new("spec");
        if let Some(v) = get("config.changeVersion").filter(|v| !v.is_empty()) {
            spec = spec.with(Node::text("changeVersion", v));
        }
        if let Some(c) = need_cpu {
            spec = spec.with(Node::text("numCPUs", c.to_string()));
        }
        if let Some(m) = need_mem {
            spec = spec.with(Node::text("memoryMB", m.to_string()));
        }
        self.run_task("ReconfigVM_Task", vm, vec![spec], TASK_TIMEOUT)
            .await?;
        let n = |v: Option<i64>| v.map_or("?".to_string(), |v| v.to_string());
        Ok(Change::Changed(format!(
            "{vm}: CPUs {} -> {}, memory {} -> {} MB",
            n(cur_cpu),
            n(need_cpu.or(cur_cpu)),
            n(cur_mem),
            n(need_mem.or(cur_mem))
        )))
    }
}

/// Where a relocation goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatastoreChoice {
    /// This datastore, by name.
    Named(String),
    /// The one with the most free space among these names (all datastores when empty).
    MostFree(Vec<String>),
}

/// A clone request.
#[derive(Debug, Clone, Default)]
pub struct CloneSpec {
    /// The new VM's name.
    pub name: String,
    /// Target folder name (the source's folder when absent).
    pub folder: Option<String>,
    /// Target resource pool name (needed when cloning a template; the first pool otherwise).
    pub resource_pool: Option<String>,
    /// Target datastore name.
    pub datastore: Option<String>,
    /// Power the clone on afterwards.
    pub power_on: bool,
}

impl Client {
    /// Finds one object of `kind` by name among all of that kind.
    pub async fn find_by_name(&self, kind: &str, name: &str) -> Result<MoRef, Error> {
        let all = self.list(kind, &["name"]).await?;
        let hits: Vec<MoRef> = all
            .into_iter()
            .filter(|(_, p)| p.iter().any(|(k, v)| k == "name" && v.text == name))
            .map(|(m, _)| m)
            .collect();
        match hits.len() {
            0 => Err(Error::NotFound(format!("{kind} named `{name}`"))),
            1 => Ok(hits.into_iter().next().expect("one")),
            n => Err(Error::Invalid(format!(
                "{n} objects of type {kind} are named `{name}` ({}); name one that is unique",
                moids(&hits)
            ))),
        }
    }

    /// Moves a VM's storage to a datastore (a given one, or the allowed one with the most
    /// free space). Already there: nothing is done.
    pub async fn relocate(&self, vm: &MoRef, choice: &DatastoreChoice) -> Result<Change, Error> {
        let all = self
            .list(
                "Datastore",
                &["name", "summary.freeSpace", "summary.accessible"],
            )
            .await?;
        let named = |(m, p): &(MoRef, Vec<(String, Node)>)| -> Option<(MoRef, String, i64, bool)> {
            let get = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.text.clone());
            Some((
                m.clone(),
                get("name")?,
                get("summary.freeSpace")?.parse().ok()?,
                get("summary.accessible").as_deref() != Some("false"),
            ))
        };
        let stores: Vec<(MoRef, String, i64, bool)> = all.iter().filter_map(named).collect();
        let target = match choice {
            DatastoreChoice::Named(n) => stores
                .iter()
                .find(|s| &s.1 == n)
                .ok_or_else(|| Error::NotFound(format!("datastore `{n}`")))?,
            DatastoreChoice::MostFree(allowed) => {
                if let Some(missing) = allowed.iter().find(|a| !stores.iter().any(|s| &s.1 == *a)) {
                    return Err(Error::NotFound(format!("datastore `{missing}`")));
                }
                stores
                    .iter()
                    .filter(|s| s.3 && (allowed.is_empty() || allowed.contains(&s.1)))
                    .max_by_key(|s| s.2)
                    .ok_or_else(|| Error::NotFound("an accessible allowed datastore".into()))?
            }
        };
        let current: Vec<String> = self
            .property(vm, "datastore")
            .await?
            .map(|n| n.children.iter().map(|c| c.text.clone()).collect())
            .unwrap_or_default();
        if current.len() == 1 && current[0] == target.0.value {
            return Ok(Change::AlreadySo(format!(
                "{vm} is on datastore {}",
                target.1
            )));
        }
        let spec = Node::new("spec").with(target.0.node("datastore"));
        self.run_task("RelocateVM_Task", vm, vec![spec], TASK_TIMEOUT)
            .await?;
        Ok(Change::Changed(format!(
            "{vm} moved to datastore {} ({} bytes free)",
            target.1, target.2
        )))
    }

    /// Puts a host into maintenance mode or takes it out.
    pub async fn host_maintenance(&self, host_name: &str, enter: bool) -> Result<Change, Error> {
        let host = self.find_by_name("HostSystem", host_name).await?;
        let now = self
            .property(&host, "runtime.inMaintenanceMode")
            .await?
            .map(|n| n.text == "true")
            .unwrap_or(false);
        if now == enter {
            return Ok(Change::AlreadySo(format!(
                "host {host_name} inMaintenanceMode={now}"
            )));
        }
        let method = if enter {
            "EnterMaintenanceMode_Task"
        } else {
            "ExitMaintenanceMode_Task"
        };
        self.run_task(
            method,
            &host,
            vec![Node::text("timeout", "0")],
            TASK_TIMEOUT,
        )
        .await?;
        Ok(Change::Changed(format!(
            "host {host_name} inMaintenanceMode={enter}"
        )))
    }

    /// Deletes a VM; a powered-on VM is powered off first only when `power_off` is set.
    /// A VM that does not exist is "already so".
    pub async fn delete_vm(&self, sel: &VmSelector, power_off: bool) -> Result<Change, Error> {
        let vm = match self.find_vm(sel).await {
            Ok(vm) => vm,
            Err(Error::NotFound(_)) => {
                return Ok(Change::AlreadySo(format!("{sel} does not exist")))
            }
            Err(e) => return Err(e),
        };
        if self.power_state(&vm).await? == "poweredOn" {
            if !power_off {
                return Err(Error::Invalid(format!(
                    "{vm} is powered on; set power_off: true to power it off before deleting"
                )));
            }
            self.run_task("PowerOffVM_Task", &vm, vec![], TASK_TIMEOUT)
                .await?;
        }
        self.run_task("Destroy_Task", &vm, vec![], TASK_TIMEOUT)
            .await?;
        Ok(Change::Changed(format!("{sel} ({vm}) deleted")))
    }

    /// "Already so" when a VM of this name exists, `None` on a definite "no such VM". A
    /// lookup that failed (a timeout, a lost session) is an error: it says nothing, and
    /// creating on it could make a second copy.
    async fn named_vm_exists(&self, name: &str) -> Result<Option<Change>, Error> {
        match self.find_vm(&VmSelector::Name(name.to_string())).await {
            Ok(existing) => Ok(Some(Change::AlreadySo(format!(
                "a VM named `{name}` exists ({existing})"
            )))),
            Err(Error::NotFound(_)) => Ok(None),
            Err(Error::Invalid(several)) => Ok(Some(Change::AlreadySo(several))),
            Err(e) => Err(e),
        }
    }

    /// Clones a VM or template. A VM with the new name already existing is "already so".
    pub async fn clone_vm(&self, source: &VmSelector, spec: &CloneSpec) -> Result<Change, Error> {
        if let Some(exists) = self.named_vm_exists(&spec.name).await? {
            return Ok(exists);
        }
        let src = self.find_vm(source).await?;
        let is_template = self
            .property(&src, "config.template")
            .await?
            .is_some_and(|n| n.text == "true");
        let folder = match &spec.folder {
            Some(f) => self.find_by_name("Folder", f).await?,
            None => self
                .property(&src, "parent")
                .await?
                .and_then(|n| MoRef::from_node(&n))
                .ok_or_else(|| {
                    Error::Invalid(format!("{src} has no parent folder; give `folder`"))
                })?,
        };
        let mut location = Node::new("location");
        match &spec.resource_pool {
            Some(p) => {
                location = location.with(self.find_by_name("ResourcePool", p).await?.node("pool"))
            }
            None if is_template => {
                let pools = self.list("ResourcePool", &["name"]).await?;
                let pool = pools
                    .into_iter()
                    .next()
                    .map(|(m, _)| m)
                    .ok_or_else(|| Error::NotFound("a resource pool".into()))?;
                location = location.with(pool.node("pool"));
            }
            None => {}
        }
        if let Some(d) = &spec.datastore {
            location = location.with(self.find_by_name("Datastore", d).await?.node("datastore"));
        }
        let clone_spec = Node::new("spec")
            .with(location)
            .with(Node::text("template", "false"))
            .with(Node::text(
                "powerOn",
                if spec.power_on { "true" } else { "false" },
            ));
        let result = self
            .run_task(
                "CloneVM_Task",
                &src,
                vec![
                    folder.node("folder"),
                    Node::text("name", &spec.name),
                    clone_spec,
                ],
                TASK_TIMEOUT,
            )
            .await?;
        let new = result.and_then(|n| MoRef::from_node(&n));
        if spec.power_on {
            if let Some(vm) = &new {
                // Some vCenters (and the simulator) ignore powerOn in the clone spec.
                if self.power_state(vm).await? != "poweredOn" {
                    self.run_task("PowerOnVM_Task", vm, vec![], TASK_TIMEOUT)
                        .await?;
                }
            }
        }
        Ok(Change::Changed(format!(
            "cloned {src} to `{}`{}",
            spec.name,
            new.map(|m| format!(" ({m})")).unwrap_or_default()
        )))
    }
}

/// A new, empty VM.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// Its name.
    pub name: String,
    /// Folder name (the first datacenter's VM folder by default).
    pub folder: Option<String>,
    /// Resource pool name (the first one by default).
    pub resource_pool: Option<String>,
    /// Datastore name (the first one by default).
    pub datastore: Option<String>,
    /// CPU count.
    pub cpus: i64,
    /// Memory in MB.
    pub memory_mb: i64,
    /// Guest OS identifier, e.g. `otherGuest64`.
    pub guest_id: String,
}

impl Client {
    async fn first(&self, kind: &str) -> Result<(MoRef, String), Error> {
        let all = self.list(kind, &["name"]).await?;
        all.into_iter()
            .next()
            .map(|(m, p)| {
                (
                    m,
                    p.into_iter()
                        .next()
                        .map(|(_, v)| v.text)
                        .unwrap_or_default(),
                )
            })
            .ok_or_else(|| Error::NotFound(format!("a {kind}")))
    }

    /// Creates an empty VM (powered off). A VM with that name already existing is "already so".
    pub async fn create_vm(&self, spec: &CreateSpec) -> Result<Change, Error> {
        if let Some(exists) = self.named_vm_exists(&spec.name).await? {
            return Ok(exists);
        }
        let folder = match &spec.folder {
            Some(f) => self.find_by_name("Folder", f).await?,
            None => {
                let (dc, _) = self.first("Datacenter").await?;
                self.property(&dc, "vmFolder")
                    .await?
                    .and_then(|n| MoRef::from_node(&n))
                    .ok_or_else(|| Error::NotFound("the datacenter's VM folder".into()))?
            }
        };
        let pool = match &spec.resource_pool {
            Some(p) => self.find_by_name("ResourcePool", p).await?,
            None => self.first("ResourcePool").await?.0,
        };
        let datastore = match &spec.datastore {
            Some(d) => d.clone(),
            None => self.first("Datastore").await?.1,
        };
        let config = Node::new("config")
            .with(Node::text("name", &spec.name))
            .with(Node::text("guestId", &spec.guest_id))
            .with(Node::new("files").with(Node::text("vmPathName", format!("[{datastore}]"))))
            .with(Node::text("numCPUs", spec.cpus.to_string()))
            .with(Node::text("memoryMB", spec.memory_mb.to_string()));
        let result = self
            .run_task(
                "CreateVM_Task",
                &folder,
                vec![config, pool.node("pool")],
                TASK_TIMEOUT,
            )
            .await?;
        let new = result.and_then(|n| MoRef::from_node(&n));
        Ok(Change::Changed(format!(
            "created `{}`{} with {} CPUs, {} MB on [{datastore}]",
            spec.name,
            new.map(|m| format!(" ({m})")).unwrap_or_default(),
            spec.cpus,
            spec.memory_mb
        )))
    }
}

impl Client {
    /// What a VM is now, for conditions and templates: `{moid, name, power_state, cpus,
    /// memory_mb, change_version, instance_uuid, guest_id, template, host, folder, resource_pool,
    /// datastores, custom_attributes, guest: {host_name, ip_address}, tags: {CATEGORY:
    /// [TAG…]}}`. Tags are read through the REST API; `tags` is absent when it cannot be
    /// reached (an error names why in `tags_error`).
    pub async fn vm_facts(&self, vm: &MoRef) -> Result<serde_json::Value, Error> {
        use serde_json::{json, Map, Value};
        let props = self
            .properties(
                vm,
                &[
                    "name",
                    "runtime.powerState",
                    "config.hardware.numCPU",
                    "config.hardware.memoryMB",
                    "config.changeVersion",
                    "config.instanceUuid",
                    "config.guestId",
                    "config.template",
                    "runtime.host",
                    "resourcePool",
                    "parent",
                    "datastore",
                    "customValue",
                    "availableField",
                    "guest.hostName",
                    "guest.ipAddress",
                ],
            )
            .await?;
        if props.is_empty() {
            return Err(Error::NotFound(vm.to_string()));
        }
        let get = |n: &str| props.iter().find(|(k, _)| k == n).map(|(_, v)| v);
        let text = |n: &str| {
            get(n)
                .map(|v| Value::String(v.text.clone()))
                .unwrap_or(Value::Null)
        };
        let int = |n: &str| {
            get(n)
                .and_then(|v| v.text.parse::<i64>().ok())
                .map_or(Value::Null, Value::from)
        };
        let name_of = |r: Option<MoRef>| async move {
            match r {
                Some(r) => self
                    .property(&r, "name")
                    .await
                    .map(|n| n.map_or(Value::Null, |n| Value::String(n.text))),
                None => Ok(Value::Null),
            }
        };
        let host = name_of(get("runtime.host").and_then(MoRef::from_node)).await?;
        let folder = name_of(get("parent").and_then(MoRef::from_node)).await?;
        let pool = name_of(get("resourcePool").and_then(MoRef::from_node)).await?;
        let mut datastores = Vec::new();
        if let Some(list) = get("datastore") {
            for d in list.children.iter().filter_map(MoRef::from_node) {
                datastores.push(name_of(Some(d)).await?);
            }
        }
        let fields: std::collections::HashMap<String, String> = get("availableField")
            .map(|f| {
                f.children
                    .iter()
                    .filter_map(|d| {
                        Some((
                            d.child_text("key")?.to_string(),
                            d.child_text("name")?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut custom = Map::new();
        if let Some(values) = get("customValue") {
            for v in &values.children {
                if let (Some(k), Some(val)) = (v.child_text("key"), v.child_text("value")) {
                    let name = fields.get(k).cloned().unwrap_or_else(|| k.to_string());
                    custom.insert(name, Value::String(val.to_string()));
                }
            }
        }
        let mut facts = json!({
            "moid": vm.value,
            "name": text("name"),
            "power_state": text("runtime.powerState"),
            "cpus": int("config.hardware.numCPU"),
            "memory_mb": int("config.hardware.memoryMB"),
            "change_version": text("config.changeVersion"),
            "instance_uuid": text("config.instanceUuid"),
            "guest_id": text("config.guestId"),
            "template": get("config.template").is_some_and(|v| v.text == "true"),
            "host": host,
            "folder": folder,
            "resource_pool": pool,
            "datastores": datastores,
            "custom_attributes": custom,
            "guest": {"host_name": text("guest.hostName"), "ip_address": text("guest.ipAddress")},
        });
        match self.tags_by_category(vm).await {
            Ok(tags) => facts["tags"] = json!(tags),
            Err(e) => facts["tags_error"] = Value::String(e.to_string()),
        }
        Ok(facts)
    }
}
