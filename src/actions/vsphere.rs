//! `type: vsphere.*` — remediation in vCenter: disconnect or connect a VM's NICs, power
//! operations, CPU/memory within configured maximums. Each reads the current state first and
//! reports what it changed or that the goal already held. Permanent errors (VM not found,
//! invalid spec, not authorized) dead-letter at once; transient ones are retried.

use super::{ActionContext, ActionError, Outcome};
use crate::template::Template;
use cloudevents::Event;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use vsphere::vm::{PowerOp, VmSelector};

/// Default time for one attempt of a vSphere action: the longest a vCenter task is
/// awaited (10 minutes) and a minute for the reads around it.
pub const TASK_ATTEMPT: std::time::Duration = std::time::Duration::from_secs(660);

/// Which VM, by one of: name, moid, instance UUID, DNS name (each a template).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VmConfig {
    /// Inventory name, e.g. `{{ event.data.Vm.Name }}`.
    Name(String),
    /// Managed object id, e.g. `{{ event.data.Vm.Vm.Value }}`.
    Moid(String),
    /// `config.instanceUuid`.
    InstanceUuid(String),
    /// Guest DNS name.
    DnsName(String),
}

/// `vsphere.disconnect_nics` / `vsphere.connect_nics`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NicsConfig {
    /// Name of a vCenter under `vcenters:`.
    pub vcenter: String,
    /// The VM.
    pub vm: VmConfig,
    /// Only these NICs (device keys, e.g. 4000); all when absent.
    pub nics: Option<Vec<i64>>,
}

/// `vsphere.power`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PowerConfig {
    /// Name of a vCenter under `vcenters:`.
    pub vcenter: String,
    /// The VM.
    pub vm: VmConfig,
    /// `on`, `off`, `reset`, `suspend`, `shutdown_guest` or `reboot_guest`.
    pub op: PowerOpConfig,
}

/// A power operation.
#[derive(Debug, Deserialize, JsonSchema, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum PowerOpConfig {
    /// Power on.
    On,
    /// Power off.
    Off,
    /// Reset.
    Reset,
    /// Suspend.
    Suspend,
    /// Guest shutdown.
    ShutdownGuest,
    /// Guest reboot.
    RebootGuest,
}

/// `vsphere.reconfigure`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconfigureConfig {
    /// Name of a vCenter under `vcenters:`.
    pub vcenter: String,
    /// The VM.
    pub vm: VmConfig,
    /// CPU count (template rendering an integer).
    pub cpus: Option<String>,
    /// Memory in MB (template rendering an integer).
    pub memory_mb: Option<String>,
    /// Largest CPU count this action may set; higher values are capped.
    pub max_cpus: Option<i64>,
    /// Largest memory this action may set; higher values are capped.
    pub max_memory_mb: Option<i64>,
}

/// `vsphere.tag` / `vsphere.untag`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TagConfig {
    /// Name of a vCenter under `vcenters:`.
    pub vcenter: String,
    /// The VM.
    pub vm: VmConfig,
    /// Tag category.
    pub category: String,
    /// Tag name (template).
    pub tag: String,
    /// `vsphere.tag`: detach the VM's other tags of the same category first.
    #[serde(default)]
    pub replace: bool,
    /// `vsphere.tag`: create the category (single cardinality) and tag when missing.
    #[serde(default)]
    pub create: bool,
}

/// `vsphere.relocate`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RelocateConfig {
    /// Name of a vCenter under `vcenters:`.
    pub vcenter: String,
    /// The VM.
    pub vm: VmConfig,
    /// A datastore by name (template); when absent, the allowed one with the most free space.
    pub datastore: Option<String>,
    /// Datastores the VM may move to (all when empty).
    #[serde(default)]
    pub allowed_datastores: Vec<String>,
}

/// `vsphere.host_maintenance`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostMaintenanceConfig {
    /// Name of a vCenter under `vcenters:`.
    pub vcenter: String,
    /// Host name (template), e.g. `{{ event.data.Host.Name }}`.
    pub host: String,
    /// `enter` or `exit`.
    pub mode: MaintenanceMode,
}

/// Maintenance mode direction.
#[derive(Debug, Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MaintenanceMode {
    /// Enter maintenance mode.
    Enter,
    /// Exit maintenance mode.
    Exit,
}

/// `vsphere.delete_vm`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteConfig {
    /// Name of a vCenter under `vcenters:`.
    pub vcenter: String,
    /// The VM.
    pub vm: VmConfig,
    /// Power a running VM off first (otherwise a running VM is refused).
    #[serde(default)]
    pub power_off: bool,
}

/// `vsphere.clone_vm`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneConfig {
    /// Name of a vCenter under `vcenters:`.
    pub vcenter: String,
    /// The VM or template to clone.
    pub vm: VmConfig,
    /// The new VM's name (template).
    pub name: String,
    /// Target folder name (the source's folder by default).
    pub folder: Option<String>,
    /// Target resource pool name.
    pub resource_pool: Option<String>,
    /// Target datastore name.
    pub datastore: Option<String>,
    /// Power the clone on.
    #[serde(default)]
    pub power_on: bool,
}

/// `vsphere.create_vm`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConfig {
    /// Name of a vCenter under `vcenters:`.
    pub vcenter: String,
    /// The new VM's name (template).
    pub name: String,
    /// Folder name (the first datacenter's VM folder by default).
    pub folder: Option<String>,
    /// Resource pool name (the first one by default).
    pub resource_pool: Option<String>,
    /// Datastore name (the first one by default).
    pub datastore: Option<String>,
    /// CPU count (default 1).
    #[serde(default = "one")]
    pub cpus: i64,
    /// Memory in MB (default 1024).
    #[serde(default = "default_memory")]
    pub memory_mb: i64,
    /// Guest OS identifier (default `otherGuest64`).
    #[serde(default = "default_guest")]
    pub guest_id: String,
}

fn one() -> i64 {
    1
}
fn default_memory() -> i64 {
    1024
}
fn default_guest() -> String {
    "otherGuest64".into()
}

#[derive(Debug)]
enum Op {
    Create {
        name: Template,
        spec: vsphere::vm::CreateSpec,
    },
    Tag {
        category: String,
        tag: Template,
        replace: bool,
        create: bool,
    },
    Untag {
        category: String,
        tag: Template,
    },
    Relocate {
        datastore: Option<Template>,
        allowed: Vec<String>,
    },
    HostMaintenance {
        host: Template,
        enter: bool,
    },
    Delete {
        power_off: bool,
    },
    Clone {
        name: Template,
        folder: Option<String>,
        pool: Option<String>,
        datastore: Option<String>,
        power_on: bool,
    },
    Nics {
        connected: bool,
        keys: Option<Vec<i64>>,
    },
    Power(PowerOp),
    Reconfigure {
        cpus: Option<Template>,
        memory_mb: Option<Template>,
        max_cpus: Option<i64>,
        max_memory_mb: Option<i64>,
    },
}

/// How the VM is selected, and the template of its name, id or UUID.
type VmTemplate = (fn(String) -> VmSelector, Template);

/// A compiled `vsphere.*` action.
#[derive(Debug)]
pub struct VsphereAction {
    vcenter: String,
    /// The VM (none for host operations).
    vm: Option<VmTemplate>,
    op: Op,
}

fn vm_selector(vm: &VmConfig) -> Result<VmTemplate, String> {
    let (f, src): (fn(String) -> VmSelector, &str) = match vm {
        VmConfig::Name(s) => (VmSelector::Name, s),
        VmConfig::Moid(s) => (VmSelector::Moid, s),
        VmConfig::InstanceUuid(s) => (VmSelector::InstanceUuid, s),
        VmConfig::DnsName(s) => (VmSelector::DnsName, s),
    };
    Ok((f, Template::compile(src).map_err(|e| format!("vm: {e}"))?))
}

impl VsphereAction {
    /// `disconnect_nics` (`connected = false`) or `connect_nics`.
    pub fn nics(c: &NicsConfig, connected: bool) -> Result<VsphereAction, String> {
        Ok(VsphereAction {
            vcenter: c.vcenter.clone(),
            vm: Some(vm_selector(&c.vm)?),
            op: Op::Nics {
                connected,
                keys: c.nics.clone(),
            },
        })
    }

    /// `power`.
    pub fn power(c: &PowerConfig) -> Result<VsphereAction, String> {
        let op = match c.op {
            PowerOpConfig::On => PowerOp::On,
            PowerOpConfig::Off => PowerOp::Off,
            PowerOpConfig::Reset => PowerOp::Reset,
            PowerOpConfig::Suspend => PowerOp::Suspend,
            PowerOpConfig::ShutdownGuest => PowerOp::ShutdownGuest,
            PowerOpConfig::RebootGuest => PowerOp::RebootGuest,
        };
        Ok(VsphereAction {
            vcenter: c.vcenter.clone(),
            vm: Some(vm_selector(&c.vm)?),
            op: Op::Power(op),
        })
    }

    /// `reconfigure`.
    pub fn reconfigure(c: &ReconfigureConfig) -> Result<VsphereAction, String> {
        if c.cpus.is_none() && c.memory_mb.is_none() {
            return Err("vsphere.reconfigure needs `cpus` and/or `memory_mb`".into());
        }
        let t = |s: &Option<String>, what: &str| {
            s.as_deref()
                .map(Template::compile)
                .transpose()
                .map_err(|e| format!("{what}: {e}"))
        };
        Ok(VsphereAction {
            vcenter: c.vcenter.clone(),
            vm: Some(vm_selector(&c.vm)?),
            op: Op::Reconfigure {
                cpus: t(&c.cpus, "cpus")?,
                memory_mb: t(&c.memory_mb, "memory_mb")?,
                max_cpus: c.max_cpus,
                max_memory_mb: c.max_memory_mb,
            },
        })
    }

    /// `tag` (`untag = false`) or `untag`.
    pub fn tag(c: &TagConfig, untag: bool) -> Result<VsphereAction, String> {
        let tag = Template::compile(&c.tag).map_err(|e| format!("tag: {e}"))?;
        Ok(VsphereAction {
            vcenter: c.vcenter.clone(),
            vm: Some(vm_selector(&c.vm)?),
            op: if untag {
                Op::Untag {
                    category: c.category.clone(),
                    tag,
                }
            } else {
                Op::Tag {
                    category: c.category.clone(),
                    tag,
                    replace: c.replace,
                    create: c.create,
                }
            },
        })
    }

    /// `relocate`.
    pub fn relocate(c: &RelocateConfig) -> Result<VsphereAction, String> {
        if c.datastore.is_some() && !c.allowed_datastores.is_empty() {
            return Err("give either `datastore` or `allowed_datastores`, not both".into());
        }
        Ok(VsphereAction {
            vcenter: c.vcenter.clone(),
            vm: Some(vm_selector(&c.vm)?),
            op: Op::Relocate {
                datastore: c
                    .datastore
                    .as_deref()
                    .map(Template::compile)
                    .transpose()
                    .map_err(|e| format!("datastore: {e}"))?,
                allowed: c.allowed_datastores.clone(),
            },
        })
    }

    /// `host_maintenance` (no VM: the host is the target).
    pub fn host_maintenance(c: &HostMaintenanceConfig) -> Result<VsphereAction, String> {
        Ok(VsphereAction {
            vcenter: c.vcenter.clone(),
            vm: None,
            op: Op::HostMaintenance {
                host: Template::compile(&c.host).map_err(|e| format!("host: {e}"))?,
                enter: c.mode == MaintenanceMode::Enter,
            },
        })
    }

    /// `delete_vm`.
    pub fn delete(c: &DeleteConfig) -> Result<VsphereAction, String> {
        Ok(VsphereAction {
            vcenter: c.vcenter.clone(),
            vm: Some(vm_selector(&c.vm)?),
            op: Op::Delete {
                power_off: c.power_off,
            },
        })
    }

    /// `create_vm`.
    pub fn create(c: &CreateConfig) -> Result<VsphereAction, String> {
        if c.cpus < 1 || c.memory_mb < 4 {
            return Err("create_vm: cpus must be at least 1 and memory_mb at least 4".into());
        }
        Ok(VsphereAction {
            vcenter: c.vcenter.clone(),
            vm: None,
            op: Op::Create {
                name: Template::compile(&c.name).map_err(|e| format!("name: {e}"))?,
                spec: vsphere::vm::CreateSpec {
                    name: String::new(),
                    folder: c.folder.clone(),
                    resource_pool: c.resource_pool.clone(),
                    datastore: c.datastore.clone(),
                    cpus: c.cpus,
                    memory_mb: c.memory_mb,
                    guest_id: c.guest_id.clone(),
                },
            },
        })
    }

    /// `clone_vm`.
    pub fn clone_vm(c: &CloneConfig) -> Result<VsphereAction, String> {
        Ok(VsphereAction {
            vcenter: c.vcenter.clone(),
            vm: Some(vm_selector(&c.vm)?),
            op: Op::Clone {
                name: Template::compile(&c.name).map_err(|e| format!("name: {e}"))?,
                folder: c.folder.clone(),
                pool: c.resource_pool.clone(),
                datastore: c.datastore.clone(),
                power_on: c.power_on,
            },
        })
    }

    /// The vCenter this action uses (checked against `vcenters:` at load).
    pub fn vcenter(&self) -> &str {
        &self.vcenter
    }

    /// Runs the operation.
    pub async fn execute(
        &self,
        event: &Event,
        ctx: &ActionContext,
    ) -> Result<Outcome, ActionError> {
        let view = json!({ "event": crate::event::view(event) });
        let sel = match &self.vm {
            Some((make, tpl)) => {
                let raw = tpl.render(&view).map_err(ActionError::permanent)?;
                let raw = raw.trim().to_string();
                if raw.is_empty() {
                    return Err(ActionError::permanent(format!(
                        "the VM template `{}` rendered empty for this event",
                        tpl.source()
                    )));
                }
                Some(make(raw))
            }
            None => None,
        };
        let client = ctx
            .vcenters
            .client(&self.vcenter)
            .await
            .map_err(|e| self.classify(e))?;
        let render = |t: &Template, what: &str| -> Result<String, vsphere::Error> {
            let s = t
                .render(&view)
                .map_err(vsphere::Error::Invalid)?
                .trim()
                .to_string();
            if s.is_empty() {
                return Err(vsphere::Error::Invalid(format!(
                    "{what} rendered empty for this event"
                )));
            }
            Ok(s)
        };
        let result = async {
            // Operations that do not act on an existing VM.
            match &self.op {
                Op::Create { name, spec } => {
                    let spec = vsphere::vm::CreateSpec {
                        name: render(name, "name")?,
                        ..spec.clone()
                    };
                    return client.create_vm(&spec).await;
                }
                Op::HostMaintenance { host, enter } => {
                    return client
                        .host_maintenance(&render(host, "host")?, *enter)
                        .await
                }
                Op::Delete { power_off } => {
                    return client
                        .delete_vm(sel.as_ref().expect("delete_vm has a VM"), *power_off)
                        .await
                }
                Op::Clone {
                    name,
                    folder,
                    pool,
                    datastore,
                    power_on,
                } => {
                    let spec = vsphere::vm::CloneSpec {
                        name: render(name, "name")?,
                        folder: folder.clone(),
                        resource_pool: pool.clone(),
                        datastore: datastore.clone(),
                        power_on: *power_on,
                    };
                    return client
                        .clone_vm(sel.as_ref().expect("clone_vm has a VM"), &spec)
                        .await;
                }
                _ => {}
            }
            let vm = client
                .find_vm(sel.as_ref().expect("VM operations have a VM"))
                .await?;
            match &self.op {
                Op::Create { .. }
                | Op::HostMaintenance { .. }
                | Op::Delete { .. }
                | Op::Clone { .. } => {
                    unreachable!("handled above")
                }
                Op::Tag {
                    category,
                    tag,
                    replace,
                    create,
                } => {
                    client
                        .tag(&vm, category, &render(tag, "tag")?, *replace, *create)
                        .await
                }
                Op::Untag { category, tag } => {
                    client.untag(&vm, category, &render(tag, "tag")?).await
                }
                Op::Relocate { datastore, allowed } => {
                    let choice = match datastore {
                        Some(t) => vsphere::vm::DatastoreChoice::Named(render(t, "datastore")?),
                        None => vsphere::vm::DatastoreChoice::MostFree(allowed.clone()),
                    };
                    client.relocate(&vm, &choice).await
                }
                Op::Nics { connected, keys } => {
                    client
                        .set_nics_connected(&vm, *connected, keys.as_deref())
                        .await
                }
                Op::Power(op) => client.power(&vm, *op).await,
                Op::Reconfigure {
                    cpus,
                    memory_mb,
                    max_cpus,
                    max_memory_mb,
                } => {
                    let num = |t: &Option<Template>,
                               max: &Option<i64>,
                               what: &str|
                     -> Result<Option<i64>, vsphere::Error> {
                        let Some(t) = t else { return Ok(None) };
                        let s = t.render(&view).map_err(vsphere::Error::Invalid)?;
                        let n: i64 = s.trim().parse().map_err(|_| {
                            vsphere::Error::Invalid(format!(
                                "{what} rendered `{s}`, not an integer"
                            ))
                        })?;
                        if n < 1 {
                            return Err(vsphere::Error::Invalid(format!(
                                "{what} rendered {n}; it must be at least 1"
                            )));
                        }
                        Ok(Some(max.map_or(n, |m| n.min(m))))
                    };
                    let c = num(cpus, max_cpus, "cpus")?;
                    let m = num(memory_mb, max_memory_mb, "memory_mb")?;
                    client.reconfigure(&vm, c, m).await
                }
            }
        }
        .await;
        match result {
            Ok(change) => Ok(Outcome {
                detail: change.to_string(),
            }),
            Err(e) => {
                if matches!(e, vsphere::Error::Connection(_)) {
                    ctx.vcenters.reset(&self.vcenter).await;
                }
                Err(self.classify(e))
            }
        }
    }

    fn classify(&self, e: vsphere::Error) -> ActionError {
        let msg = format!("vcenter `{}`: {e}", self.vcenter);
        if e.is_transient() {
            ActionError::transient(msg)
        } else {
            ActionError::permanent(msg)
        }
    }
}
