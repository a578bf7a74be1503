//! Clusters as they are now (hosts in maintenance mode, VMs powered on or off), for budgets
//! checked against the live inventory just before a change.

use crate::xml::Node;
use crate::{Client, Error, MoRef};

/// One host of a cluster.
#[derive(Debug, Clone)]
pub struct HostState {
    /// Its reference.
    pub host: MoRef,
    /// Its name.
    pub name: String,
    /// `runtime.inMaintenanceMode`.
    pub in_maintenance: bool,
}

/// One VM of a cluster (templates are left out).
#[derive(Debug, Clone)]
pub struct VmState {
    /// Its reference.
    pub vm: MoRef,
    /// Its name.
    pub name: String,
    /// `runtime.powerState` is `poweredOn`.
    pub powered_on: bool,
}

/// A cluster's hosts and the VMs running on them, read now.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The `ClusterComputeResource`.
    pub cluster: MoRef,
    /// Its name.
    pub name: String,
    /// Its hosts.
    pub hosts: Vec<HostState>,
    /// The VMs registered on its hosts.
    pub vms: Vec<VmState>,
}

fn prop<'a>(props: &'a [(String, Node)], name: &str) -> Option<&'a Node> {
    props.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

impl Client {
    /// The cluster host `host` belongs to, with its members as they are now; `None` for a
    /// standalone host.
    pub async fn cluster_of_host(&self, host: &MoRef) -> Result<Option<Cluster>, Error> {
        let hosts = self
            .list(
                "HostSystem",
                &["name", "parent", "runtime.inMaintenanceMode"],
            )
            .await?;
        let parent_of = |p: &[(String, Node)]| prop(p, "parent").and_then(MoRef::from_node);
        let Some(cluster) = hosts
            .iter()
            .find(|(h, _)| h == host)
            .and_then(|(_, p)| parent_of(p))
            .filter(|c| c.kind == "ClusterComputeResource")
        else {
            return Ok(None);
        };
        let name = self
            .property(&cluster, "name")
            .await?
            .map(|n| n.text)
            .unwrap_or_default();
        let members: Vec<HostState> = hosts
            .iter()
            .filter(|(_, p)| parent_of(p).as_ref() == Some(&cluster))
            .map(|(h, p)| HostState {
                host: h.clone(),
                name: prop(p, "name").map(|n| n.text.clone()).unwrap_or_default(),
                in_maintenance: prop(p, "runtime.inMaintenanceMode")
                    .is_some_and(|n| n.text == "true"),
            })
            .collect();
        let vms = self
            .list(
                "VirtualMachine",
                &[
                    "name",
                    "runtime.host",
                    "runtime.powerState",
                    "config.template",
                ],
            )
            .await?
            .into_iter()
            .filter(|(_, p)| {
                prop(p, "config.template").is_none_or(|n| n.text != "true")
                    && prop(p, "runtime.host")
                        .and_then(MoRef::from_node)
                        .is_some_and(|h| members.iter().any(|m| m.host == h))
            })
            .map(|(vm, p)| VmState {
                vm,
                name: prop(&p, "name").map(|n| n.text.clone()).unwrap_or_default(),
                powered_on: prop(&p, "runtime.powerState").is_some_and(|n| n.text == "poweredOn"),
            })
            .collect();
        Ok(Some(Cluster {
            cluster,
            name,
            hosts: members,
            vms,
        }))
    }

    /// The cluster of the host VM `vm` is registered on; `None` when that host is standalone.
    pub async fn cluster_of_vm(&self, vm: &MoRef) -> Result<Option<Cluster>, Error> {
        match self
            .property(vm, "runtime.host")
            .await?
            .as_ref()
            .and_then(MoRef::from_node)
        {
            Some(host) => self.cluster_of_host(&host).await,
            None => Ok(None),
        }
    }
}

impl Client {
    /// A host's facts: name, connection, power and maintenance state, its cluster (or
    /// compute resource), CPU cores, memory, the VMs registered on it and how many are on.
    pub async fn host_facts(&self, host: &MoRef) -> Result<serde_json::Value, Error> {
        let props = self
            .properties(
                host,
                &[
                    "name",
                    "parent",
                    "runtime.connectionState",
                    "runtime.powerState",
                    "runtime.inMaintenanceMode",
                    "summary.hardware.numCpuCores",
                    "summary.hardware.memorySize",
                    "vm",
                ],
            )
            .await?;
        let text = |n: &str| prop(&props, n).map(|v| v.text.clone());
        let parent = prop(&props, "parent").and_then(MoRef::from_node);
        let cluster = match &parent {
            Some(p) => self.property(p, "name").await?.map(|n| n.text),
            None => None,
        };
        let mut vms = Vec::new();
        let mut powered_on = 0;
        for vm in prop(&props, "vm")
            .map(|l| {
                l.children
                    .iter()
                    .filter_map(MoRef::from_node)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
        {
            let p = self
                .properties(&vm, &["name", "runtime.powerState"])
                .await?;
            if prop(&p, "runtime.powerState").is_some_and(|n| n.text == "poweredOn") {
                powered_on += 1;
            }
            vms.push(prop(&p, "name").map(|n| n.text.clone()).unwrap_or_default());
        }
        let memory = text("summary.hardware.memorySize")
            .and_then(|m| m.parse::<i64>().ok())
            .map(|b| b / (1024 * 1024));
        Ok(serde_json::json!({
            "name": text("name"),
            "moid": host.value,
            "connection_state": text("runtime.connectionState"),
            "power_state": text("runtime.powerState"),
            "in_maintenance": text("runtime.inMaintenanceMode").as_deref() == Some("true"),
            "cluster": parent.as_ref().filter(|p| p.kind == "ClusterComputeResource").and(cluster.clone()),
            "compute_resource": cluster,
            "cpu_cores": text("summary.hardware.numCpuCores").and_then(|c| c.parse::<i64>().ok()),
            "memory_mb": memory,
            "vms": vms,
            "vms_powered_on": powered_on,
        }))
    }
}
