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

#[derive(Debug)]
enum Op {
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
    vm: VmTemplate,
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
            vm: vm_selector(&c.vm)?,
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
            vm: vm_selector(&c.vm)?,
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
            vm: vm_selector(&c.vm)?,
            op: Op::Reconfigure {
                cpus: t(&c.cpus, "cpus")?,
                memory_mb: t(&c.memory_mb, "memory_mb")?,
                max_cpus: c.max_cpus,
                max_memory_mb: c.max_memory_mb,
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
        let raw = self.vm.1.render(&view).map_err(ActionError::permanent)?;
        let raw = raw.trim().to_string();
        if raw.is_empty() {
            return Err(ActionError::permanent(format!(
                "the VM template `{}` rendered empty for this event",
                self.vm.1.source()
            )));
        }
        let sel = (self.vm.0)(raw);
        let client = ctx
            .vcenters
            .client(&self.vcenter)
            .await
            .map_err(|e| self.classify(e))?;
        let result = async {
            let vm = client.find_vm(&sel).await?;
            match &self.op {
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
