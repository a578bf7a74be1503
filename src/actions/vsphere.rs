//! `type: vsphere.*` — remediation in vCenter: disconnect or connect a VM's NICs, power
//! operations, CPU/memory within configured maximums. Each reads the current state first and
//! reports what it changed or that the goal already held. Permanent errors (VM not found,
//! invalid spec, not authorized) dead-letter at once; transient ones are retried.

use super::{ActionContext, ActionError, Outcome};
use crate::template::Template;
use cloudevents::Event;
use schemars::JsonSchema;
use serde::Deserialize;
use vsphere::vm::{PowerOp, VmSelector};

/// Default time for one attempt of a vSphere action: the longest a vCenter task is
/// awaited (10 minutes) and a minute for the reads around it.
pub const TASK_ATTEMPT: std::time::Duration = std::time::Duration::from_secs(660);

/// How often a change held by a paused scope is looked at again (a lift wakes it at once
/// on the node that lifts it; this covers the others).
const SCOPE_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

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
    /// A condition the VM's facts must meet after the change (`vm.cpus == 4`), checked
    /// until it holds or its timeout; otherwise the delivery fails verification.
    #[serde(default)]
    pub verify: Option<VerifyConfig>,
}

/// `vsphere.get_host`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetHostConfig {
    /// Name of a vCenter under `vcenters:`.
    pub vcenter: String,
    /// The host's name (template), e.g. `{{ steps.look.output.host }}`.
    pub host: String,
}

/// `vsphere.get_vm`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetVmConfig {
    /// Name of a vCenter under `vcenters:`.
    pub vcenter: String,
    /// The VM.
    pub vm: VmConfig,
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
    /// A condition the VM's facts must meet after the change (`vm.cpus == 4`), checked
    /// until it holds or its timeout; otherwise the delivery fails verification.
    #[serde(default)]
    pub verify: Option<VerifyConfig>,
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
    /// A condition the VM's facts must meet after the change (`vm.cpus == 4`), checked
    /// until it holds or its timeout; otherwise the delivery fails verification.
    #[serde(default)]
    pub verify: Option<VerifyConfig>,
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
    /// A condition the VM's facts must meet after the change (`vm.cpus == 4`), checked
    /// until it holds or its timeout; otherwise the delivery fails verification.
    #[serde(default)]
    pub verify: Option<VerifyConfig>,
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
    /// A condition the VM's facts must meet after the change (`vm.cpus == 4`), checked
    /// until it holds or its timeout; otherwise the delivery fails verification.
    #[serde(default)]
    pub verify: Option<VerifyConfig>,
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
    GetVm,
    GetHost {
        host: Template,
    },
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
    /// The goal checked after the change.
    verify: Option<Box<Verify>>,
}

/// `verify:` — a condition the VM's facts must meet after the change.
#[derive(Debug, Deserialize, JsonSchema, Clone)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// CEL over `vm` (the facts of `vsphere.get_vm`), e.g. `vm.cpus == 4`.
    pub condition: String,
    /// How long the condition may take to hold (default 60s).
    #[serde(default)]
    pub timeout: Option<crate::config::Duration>,
}

/// A compiled `verify:`.
struct Verify {
    source: String,
    program: cel::Program,
    timeout: std::time::Duration,
}

impl std::fmt::Debug for Verify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verify({:?}, {:?})", self.source, self.timeout)
    }
}

impl Verify {
    fn build(c: &Option<VerifyConfig>) -> Result<Option<Box<Verify>>, String> {
        let Some(c) = c else { return Ok(None) };
        let program = cel::Program::compile(&c.condition)
            .map_err(|e| format!("verify.condition `{}`: {e}", c.condition))?;
        Ok(Some(Box::new(Verify {
            source: c.condition.clone(),
            program,
            timeout: c
                .timeout
                .map_or(std::time::Duration::from_secs(60), |d| d.0),
        })))
    }

    /// Reads the VM's facts until the condition holds; an error (permanent) when it does
    /// not within the timeout.
    async fn check(
        &self,
        client: &vsphere::Client,
        vm: &vsphere::MoRef,
    ) -> Result<(), vsphere::Error> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut wait = std::time::Duration::from_millis(200);
        loop {
            let facts = client.vm_facts(vm).await?;
            let mut ctx = cel::Context::default();
            let value =
                cel::to_value(&facts).map_err(|e| vsphere::Error::Invalid(e.to_string()))?;
            ctx.add_variable_from_value("vm", value);
            match self.program.execute(&ctx) {
                Ok(cel::Value::Bool(true)) => return Ok(()),
                Ok(cel::Value::Bool(false)) => {}
                Ok(other) => {
                    return Err(vsphere::Error::Invalid(format!(
                        "failed verification: `{}` gave {other:?}, not a boolean",
                        self.source
                    )))
                }
                Err(e) => {
                    return Err(vsphere::Error::Invalid(format!(
                        "failed verification: `{}`: {e}",
                        self.source
                    )))
                }
            }
            if tokio::time::Instant::now() + wait > deadline {
                return Err(vsphere::Error::Invalid(format!(
                    "failed verification: `{}` did not hold within {:?} after the change (the VM has {} CPUs, {} MB, {})",
                    self.source, self.timeout, facts["cpus"], facts["memory_mb"], facts["power_state"]
                )));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(5));
        }
    }
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
            verify: Verify::build(&c.verify)?,
        })
    }

    /// `get_vm`: reads the VM's facts (nothing is changed).
    pub fn get_vm(c: &GetVmConfig) -> Result<VsphereAction, String> {
        Ok(VsphereAction {
            vcenter: c.vcenter.clone(),
            vm: Some(vm_selector(&c.vm)?),
            op: Op::GetVm,
            verify: None,
        })
    }

    /// `get_host`: reads a host's facts (nothing is changed).
    pub fn get_host(c: &GetHostConfig) -> Result<VsphereAction, String> {
        Ok(VsphereAction {
            vcenter: c.vcenter.clone(),
            vm: None,
            op: Op::GetHost {
                host: Template::compile(&c.host).map_err(|e| format!("host: {e}"))?,
            },
            verify: None,
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
            verify: Verify::build(&c.verify)?,
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
            verify: Verify::build(&c.verify)?,
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
            verify: Verify::build(&c.verify)?,
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
            verify: Verify::build(&c.verify)?,
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
            verify: None,
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
            verify: None,
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
            verify: None,
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
            verify: None,
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
        let view = super::template_view(event, None);
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
        // Guard rail: protected objects are refused before anything is read for the change.
        if let Some(why) = self.protected(&client, ctx, sel.as_ref(), &render).await? {
            return Err(ActionError::permanent(format!(
                "vcenter `{}`: refused by a guard rail: {why} (vcenters.{}.protect); nothing was changed",
                self.vcenter, self.vcenter
            )));
        }
        // A task an earlier attempt left running is awaited first: its change may be done
        // or under way, and the state read below then shows what is still to do.
        let earlier = client
            .await_earlier_task(vsphere::vm::TASK_TIMEOUT)
            .await
            .map_err(|e| self.classify(e))?;
        // Guard rails: paused scopes and budgets, read from the live inventory now (a dry
        // run changes nothing, so nothing is held).
        if !super::dry_run() {
            if let Some((key, why)) = self
                .paused_scope(&client, ctx, sel.as_ref(), &render)
                .await?
            {
                return Err(ActionError {
                    waiting_until: Some(crate::store::now_ms() + SCOPE_RECHECK.as_millis() as i64),
                    ..ActionError::transient(format!(
                        "vcenter `{}`: held by a pause ({key}): {why}; it runs when the pause is lifted (`reflex pauses lift '{key}'`), or ends dead if it is discarded (`reflex pauses discard '{key}'`); nothing was changed",
                        self.vcenter
                    ))
                });
            }
        }
        // Held until this change is made (and shows in the inventory) when a budget
        // applies: the next change of the cluster reads the budget after it.
        let mut _budget_lock = None;
        if !super::dry_run() {
            let verdict = match self
                .budget_cluster(&client, ctx, sel.as_ref(), &render)
                .await?
            {
                None => None,
                Some(cluster) => {
                    let key = format!("{}:{}", self.vcenter, cluster.value);
                    match ctx.budget_locks.try_lock(&key).await {
                        Ok(Some(lock)) => {
                            _budget_lock = Some(lock);
                            self.over_budget(&client, ctx, sel.as_ref(), &render)
                                .await?
                        }
                        Ok(None) => Some(format!(
                            "another change under the budgets of cluster `{}` is under way (on this node or another); this one reads them once it is done",
                            cluster.value
                        )),
                        Err(e) => {
                            return Err(ActionError::transient(format!(
                                "vcenter `{}`: cannot take the lock of cluster `{}`'s budgets from the store: {e}; nothing was changed",
                                self.vcenter, cluster.value
                            )))
                        }
                    }
                }
            };
            if let Some(why) = verdict {
                let recheck = ctx
                    .vcenters
                    .budgets(&self.vcenter)
                    .map_or(std::time::Duration::from_secs(60), |b| b.recheck.0);
                return Err(ActionError {
                    waiting_until: Some(
                        crate::store::now_ms() + recheck.as_millis().min(i64::MAX as u128) as i64,
                    ),
                    ..ActionError::transient(format!(
                        "vcenter `{}`: held by a budget: {why} (vcenters.{}.budgets); checked again in {recheck:?}; nothing was changed",
                        self.vcenter, self.vcenter
                    ))
                });
            }
        }
        // What `get_vm` read, for the step's output.
        let read: std::sync::Mutex<Option<serde_json::Value>> = std::sync::Mutex::new(None);
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
                Op::GetHost { host } => {
                    let name = render(host, "host")?;
                    let h = client.find_by_name("HostSystem", &name).await?;
                    let facts = client.host_facts(&h).await?;
                    let detail = format!(
                        "read host {name} ({h}): {}, {}, in maintenance: {}, {} of {} VMs on",
                        facts["connection_state"].as_str().unwrap_or("?"),
                        facts["power_state"].as_str().unwrap_or("?"),
                        facts["in_maintenance"],
                        facts["vms_powered_on"],
                        facts["vms"].as_array().map_or(0, Vec::len)
                    );
                    *read.lock().unwrap_or_else(|p| p.into_inner()) = Some(facts);
                    return Ok(vsphere::vm::Change::AlreadySo(detail));
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
            let change = match &self.op {
                Op::GetVm => {
                    let facts = client.vm_facts(&vm).await?;
                    let detail = format!(
                        "read {} ({}): {}, {} CPUs, {} MB",
                        facts["name"].as_str().unwrap_or(""),
                        vm,
                        facts["power_state"].as_str().unwrap_or("?"),
                        facts["cpus"],
                        facts["memory_mb"]
                    );
                    *read.lock().unwrap_or_else(|p| p.into_inner()) = Some(facts);
                    Ok(vsphere::vm::Change::AlreadySo(detail))
                }
                Op::Create { .. }
                | Op::GetHost { .. }
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
            }?;
            // The goal must hold afterwards (not in a dry run: nothing was changed).
            if let Some(v) = &self.verify {
                if !super::dry_run() {
                    v.check(&client, &vm).await?;
                }
            }
            Ok(change)
        }
        .await;
        match result {
            Ok(change) => Ok(Outcome {
                output: read.into_inner().unwrap_or_else(|p| p.into_inner()),
                detail: match (&self.op, earlier) {
                    // A read is not a change: its detail is what it read.
                    (Op::GetVm | Op::GetHost { .. }, _) => change
                        .to_string()
                        .trim_start_matches("already so: ")
                        .to_string(),
                    // A dry run: what would change, from the state read now.
                    _ if super::dry_run() => {
                        let calls = vsphere::journal::TaskJournal::planned_now();
                        match change {
                            vsphere::vm::Change::Changed(what) => format!(
                                "dry run: would change: {what} (calls not made: {}); nothing was changed",
                                calls.join(", ")
                            ),
                            already => format!("dry run: nothing to do: {already}"),
                        }
                    }
                    (_, Some(note)) => format!("{change} ({note})"),
                    (_, None) => change.to_string(),
                },
            }),
            Err(e) => {
                if matches!(e, vsphere::Error::Connection(_)) {
                    ctx.vcenters.reset(&self.vcenter).await;
                }
                Err(self.classify(e))
            }
        }
    }

    /// The paused scope this change falls in, with why, if one does.
    async fn paused_scope(
        &self,
        client: &vsphere::Client,
        ctx: &ActionContext,
        sel: Option<&VmSelector>,
        render: &(dyn Fn(&Template, &str) -> Result<String, vsphere::Error> + Sync),
    ) -> Result<Option<(String, String)>, ActionError> {
        let scopes = ctx.pauses.scopes(&self.vcenter);
        if scopes.is_empty() {
            return Ok(None);
        }
        let e = |e| self.classify(e);
        let in_cluster = |c: Option<vsphere::inventory::Cluster>| {
            let c = c?;
            scopes
                .iter()
                .find(|s| s.kind == "cluster" && s.name == c.name)
                .map(|s| (s.key(), format!("it is in cluster `{}`", c.name)))
        };
        let wants_cluster = scopes.iter().any(|s| s.kind == "cluster");
        match &self.op {
            Op::GetVm | Op::GetHost { .. } | Op::Create { .. } | Op::Clone { .. } => Ok(None),
            Op::HostMaintenance { host, .. } => {
                if !wants_cluster {
                    return Ok(None);
                }
                let name = render(host, "host").map_err(e)?;
                let h = match client.find_by_name("HostSystem", &name).await {
                    Ok(h) => h,
                    Err(vsphere::Error::NotFound(_)) => return Ok(None),
                    Err(x) => return Err(e(x)),
                };
                Ok(in_cluster(client.cluster_of_host(&h).await.map_err(e)?))
            }
            _ => {
                let Some(sel) = sel else { return Ok(None) };
                let vm = match client.find_vm(sel).await {
                    Ok(vm) => vm,
                    Err(vsphere::Error::NotFound(_)) => return Ok(None),
                    Err(x) => return Err(e(x)),
                };
                if wants_cluster {
                    if let Some(hit) = in_cluster(client.cluster_of_vm(&vm).await.map_err(e)?) {
                        return Ok(Some(hit));
                    }
                }
                let facts = client.vm_facts(&vm).await.map_err(e)?;
                // The same matching as protected objects, one scope at a time.
                Ok(scopes.iter().find_map(|s| {
                    let mut rule = crate::vcenters::ProtectConfig::default();
                    match s.kind.as_str() {
                        "folder" => rule.folders.push(s.name.clone()),
                        "tag" => rule.tags.push(s.name.clone()),
                        "resource_pool" => rule.resource_pools.push(s.name.clone()),
                        _ => return None,
                    }
                    rule.vm_rule(&facts).map(|why| (s.key(), why))
                }))
            }
        }
    }

    /// The cluster whose budgets this change counts against, if a budget applies to it.
    async fn budget_cluster(
        &self,
        client: &vsphere::Client,
        ctx: &ActionContext,
        sel: Option<&VmSelector>,
        render: &(dyn Fn(&Template, &str) -> Result<String, vsphere::Error> + Sync),
    ) -> Result<Option<vsphere::MoRef>, ActionError> {
        let Some(b) = ctx.vcenters.budgets(&self.vcenter) else {
            return Ok(None);
        };
        let e = |e| self.classify(e);
        let vm_cluster = || async {
            let Some(sel) = sel else { return Ok(None) };
            Ok(self
                .vm_in_cluster(client, sel)
                .await?
                .map(|(_, c)| c.cluster))
        };
        match &self.op {
            Op::HostMaintenance { host, enter: true } if b.hosts_in_maintenance.is_some() => {
                let name = render(host, "host").map_err(e)?;
                let h = match client.find_by_name("HostSystem", &name).await {
                    Ok(h) => h,
                    Err(vsphere::Error::NotFound(_)) => return Ok(None),
                    Err(x) => return Err(e(x)),
                };
                Ok(client
                    .cluster_of_host(&h)
                    .await
                    .map_err(e)?
                    .map(|c| c.cluster))
            }
            Op::Power(
                vsphere::vm::PowerOp::Off
                | vsphere::vm::PowerOp::Suspend
                | vsphere::vm::PowerOp::ShutdownGuest,
            )
            | Op::Delete { .. }
                if b.vms_powered_off.is_some() =>
            {
                vm_cluster().await
            }
            Op::Reconfigure { .. } if b.vms_reconfigured_per_hour.is_some() => vm_cluster().await,
            _ => Ok(None),
        }
    }

    /// Why a budget of the vCenter holds this change now, if one does.
    async fn over_budget(
        &self,
        client: &vsphere::Client,
        ctx: &ActionContext,
        sel: Option<&VmSelector>,
        render: &(dyn Fn(&Template, &str) -> Result<String, vsphere::Error> + Sync),
    ) -> Result<Option<String>, ActionError> {
        let Some(b) = ctx.vcenters.budgets(&self.vcenter) else {
            return Ok(None);
        };
        let e = |e| self.classify(e);
        match &self.op {
            Op::HostMaintenance { host, enter: true } => {
                let Some(max) = b.hosts_in_maintenance else {
                    return Ok(None);
                };
                let name = render(host, "host").map_err(e)?;
                let h = match client.find_by_name("HostSystem", &name).await {
                    Ok(h) => h,
                    // The action itself reports a host that is not there.
                    Err(vsphere::Error::NotFound(_)) => return Ok(None),
                    Err(x) => return Err(e(x)),
                };
                let Some(c) = client.cluster_of_host(&h).await.map_err(e)? else {
                    return Ok(None);
                };
                if c.hosts.iter().any(|x| x.host == h && x.in_maintenance) {
                    return Ok(None);
                }
                let others: Vec<&str> = c
                    .hosts
                    .iter()
                    .filter(|x| x.in_maintenance && x.host != h)
                    .map(|x| x.name.as_str())
                    .collect();
                Ok((others.len() as u64 >= u64::from(max)).then(|| {
                    format!(
                        "{} of the {} hosts of cluster `{}` in maintenance mode already ({}); at most {max} at once (hosts_in_maintenance)",
                        others.len(),
                        c.hosts.len(),
                        c.name,
                        others.join(", ")
                    )
                }))
            }
            Op::Power(
                vsphere::vm::PowerOp::Off
                | vsphere::vm::PowerOp::Suspend
                | vsphere::vm::PowerOp::ShutdownGuest,
            )
            | Op::Delete { .. } => {
                let (Some(max), Some(sel)) = (b.vms_powered_off, sel) else {
                    return Ok(None);
                };
                let Some((vm, c)) = self.vm_in_cluster(client, sel).await? else {
                    return Ok(None);
                };
                // Off already: nothing more would be off.
                let Some(me) = c.vms.iter().find(|v| v.vm == vm && v.powered_on) else {
                    return Ok(None);
                };
                let off = c.vms.iter().filter(|v| !v.powered_on).count() + 1;
                let share = off as f64 * 100.0 / c.vms.len().max(1) as f64;
                Ok((share > max.0).then(|| {
                    format!(
                        "powering off `{}` would leave {off} of the {} VMs of cluster `{}` off ({share:.0}%); at most {}% at once (vms_powered_off)",
                        me.name,
                        c.vms.len(),
                        c.name,
                        max.0
                    )
                }))
            }
            Op::Reconfigure { .. } => {
                let (Some(max), Some(sel)) = (b.vms_reconfigured_per_hour, sel) else {
                    return Ok(None);
                };
                let Some((vm, c)) = self.vm_in_cluster(client, sel).await? else {
                    return Ok(None);
                };
                let since = chrono::Utc::now() - chrono::Duration::hours(1);
                let events = client
                    .query_events(&c.cluster, &["VmReconfiguredEvent"], since)
                    .await
                    .map_err(e)?;
                let mut done: std::collections::HashSet<&str> = events
                    .iter()
                    .filter_map(|ev| ev.path(&["vm", "vm"]).map(|n| n.text.as_str()))
                    .filter(|id| c.vms.iter().any(|v| v.vm.value == *id))
                    .collect();
                // Reconfigured already this hour: it counts once.
                if done.contains(vm.value.as_str()) {
                    return Ok(None);
                }
                let before = done.len();
                done.insert(vm.value.as_str());
                let share = done.len() as f64 * 100.0 / c.vms.len().max(1) as f64;
                Ok((share > max.0).then(|| {
                    format!(
                        "{before} of the {} VMs of cluster `{}` were reconfigured within the last hour; one more would be {share:.0}%; at most {}% per hour (vms_reconfigured_per_hour)",
                        c.vms.len(),
                        c.name,
                        max.0
                    )
                }))
            }
            _ => Ok(None),
        }
    }

    /// The VM a budget concerns and its cluster, read now; `None` when the VM is not there
    /// (the action itself reports it) or is on a standalone host (no budget applies).
    async fn vm_in_cluster(
        &self,
        client: &vsphere::Client,
        sel: &VmSelector,
    ) -> Result<Option<(vsphere::MoRef, vsphere::inventory::Cluster)>, ActionError> {
        let vm = match client.find_vm(sel).await {
            Ok(vm) => vm,
            Err(vsphere::Error::NotFound(_)) => return Ok(None),
            Err(x) => return Err(self.classify(x)),
        };
        let cluster = client
            .cluster_of_vm(&vm)
            .await
            .map_err(|x| self.classify(x))?;
        Ok(cluster.map(|c| (vm, c)))
    }

    /// Why the object this action would change is protected, if it is.
    async fn protected(
        &self,
        client: &vsphere::Client,
        ctx: &ActionContext,
        sel: Option<&VmSelector>,
        render: &(dyn Fn(&Template, &str) -> Result<String, vsphere::Error> + Sync),
    ) -> Result<Option<String>, ActionError> {
        let Some(protect) = ctx.vcenters.protect(&self.vcenter) else {
            return Ok(None);
        };
        match &self.op {
            Op::GetVm | Op::GetHost { .. } | Op::Create { .. } | Op::Clone { .. } => Ok(None),
            Op::HostMaintenance { host, .. } => {
                let h = render(host, "host").map_err(|e| self.classify(e))?;
                Ok(protect
                    .host_rule(&h)
                    .map(|r| format!("host `{h}` is protected: {r}")))
            }
            _ if protect.guards_vms() => {
                let Some(sel) = sel else { return Ok(None) };
                let vm = match client.find_vm(sel).await {
                    Ok(vm) => vm,
                    // The action itself reports a VM that is not there.
                    Err(vsphere::Error::NotFound(_)) => return Ok(None),
                    Err(e) => return Err(self.classify(e)),
                };
                let facts = client.vm_facts(&vm).await.map_err(|e| self.classify(e))?;
                Ok(protect.vm_rule(&facts).map(|r| {
                    format!(
                        "VM `{}` ({vm}) is protected: {r}",
                        facts["name"].as_str().unwrap_or("")
                    )
                }))
            }
            _ => Ok(None),
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

/// Appended to the record of an attempt that ended while the vCenter task it started was
/// still running; [`running_task`] reads it back for the next attempt.
pub fn task_note(task: &str) -> String {
    format!(" [vCenter task {task} still running: the next attempt waits for it]")
}

/// The task an attempt's record says it left running (see [`task_note`]).
pub fn running_task(detail: &str) -> Option<String> {
    let rest = &detail[detail.rfind("[vCenter task ")? + "[vCenter task ".len()..];
    let key = rest.split(' ').next()?;
    (!key.is_empty() && rest[key.len()..].starts_with(" still running:")).then(|| key.to_string())
}

#[cfg(test)]
mod task_note_tests {
    use super::{running_task, task_note};

    #[test]
    fn the_task_left_running_is_read_back_from_the_record() {
        let detail = format!(
            "attempt timed out after 30s (vsphere.power action){}",
            task_note("task-42")
        );
        assert_eq!(running_task(&detail).as_deref(), Some("task-42"));
        assert_eq!(running_task("attempt timed out after 30s"), None);
        // Text an event put in an error message cannot pass for the note unless it is whole.
        assert_eq!(running_task("vcenter `vc1`: [vCenter task x"), None);
    }
}
