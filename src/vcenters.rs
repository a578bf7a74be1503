//! The vCenters of the configuration, by name: one logged-in client each, connected on first
//! use and shared by the `vcenter` source and the `vsphere.*` actions.

use crate::config::{Diagnostics, Duration, Secret, Text};
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::Mutex;

/// How to reach one vCenter.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VcenterConfig {
    /// The SDK URL, e.g. `https://vcenter.example.com/sdk`.
    #[schemars(with = "String")]
    pub url: Text,
    /// User name.
    pub username: Secret,
    /// Password.
    pub password: Secret,
    /// Accept any TLS certificate (labs only; logged as a warning).
    #[serde(default)]
    pub insecure: bool,
    /// A PEM file of CA certificates to trust besides the system's.
    pub ca_file: Option<String>,
    /// Trust exactly the certificate with this SHA-1 or SHA-256 thumbprint (`AA:BB:…`).
    pub thumbprint: Option<String>,
    /// Time allowed for one call (default 60s).
    pub timeout: Option<Duration>,
    /// Objects no changing `vsphere.*` action may touch (a guard rail).
    #[serde(default)]
    pub protect: ProtectConfig,
    /// Limits checked against the live inventory just before a change (a guard rail): a
    /// change past one waits and is checked again.
    #[serde(default)]
    pub budgets: BudgetConfig,
    /// Mark this vCenter's events made by `username` as reflex's own (`reflexcaused`), so
    /// that triggers do not fire on their own effects (default true). Give reflex a user of
    /// its own; turn this off only when it shares one with people whose changes must count.
    #[serde(default = "default_true")]
    pub loop_guard: bool,
}

fn default_true() -> bool {
    true
}

/// Budgets per cluster, read from the vCenter before each change they limit. A change past
/// one is held: its delivery waits (`retrying`, the attempt recorded as `waiting` with the
/// reason, not counted toward `max_attempts`) and is checked again after `recheck`.
#[derive(Debug, Deserialize, JsonSchema, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Most hosts of one cluster in maintenance mode at once, the one entering included
    /// (`vsphere.host_maintenance` with `mode: enter`).
    pub hosts_in_maintenance: Option<u32>,
    /// Most of a cluster's VMs powered off at once, the one to power off included, e.g.
    /// `25%` (`vsphere.power` off, suspend or shutdown_guest, and `vsphere.delete_vm`, on a
    /// powered-on VM). Templates are not counted.
    #[schemars(with = "Option<String>")]
    pub vms_powered_off: Option<Percent>,
    /// Most of a cluster's VMs reconfigured within the last hour, the one to reconfigure
    /// included, e.g. `10%` (`vsphere.reconfigure`). Counted from the vCenter's own
    /// `VmReconfiguredEvent`s of the hour, whoever made them; a VM reconfigured already
    /// this hour does not count twice.
    #[schemars(with = "Option<String>")]
    pub vms_reconfigured_per_hour: Option<Percent>,
    /// How long a held change waits before it is checked again (default 1m).
    pub recheck: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            hosts_in_maintenance: None,
            vms_powered_off: None,
            vms_reconfigured_per_hour: None,
            recheck: Duration(std::time::Duration::from_secs(60)),
        }
    }
}

/// A share, written `25%` (or a number of percent).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(pub f64);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Number(f64),
            Text(String),
        }
        let v = match Written::deserialize(d)? {
            Written::Number(n) => n,
            Written::Text(t) => t
                .trim()
                .strip_suffix('%')
                .and_then(|n| n.trim().parse::<f64>().ok())
                .ok_or_else(|| {
                    serde::de::Error::custom(format!("`{t}` is not a share; write e.g. `25%`"))
                })?,
        };
        if !(0.0..=100.0).contains(&v) {
            return Err(serde::de::Error::custom(format!(
                "{v}% is not between 0% and 100%"
            )));
        }
        Ok(Percent(v))
    }
}

/// Protected objects: every changing vSphere action refuses them, permanently, with the
/// rule that matched (nothing is changed; the delivery is dead with the reason).
#[derive(Debug, Deserialize, JsonSchema, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ProtectConfig {
    /// VMs carrying one of these tags: `CATEGORY/TAG`, or `TAG` in any category.
    #[serde(default)]
    pub tags: Vec<String>,
    /// VM names matching one of these patterns (`*` any run of characters, `?` one).
    #[serde(default)]
    pub names: Vec<String>,
    /// VMs directly in one of these folders (by name).
    #[serde(default)]
    pub folders: Vec<String>,
    /// VMs in one of these resource pools (by name).
    #[serde(default)]
    pub resource_pools: Vec<String>,
    /// Hosts (maintenance mode) whose names match one of these patterns.
    #[serde(default)]
    pub hosts: Vec<String>,
}

impl ProtectConfig {
    /// Whether VM rules are set (reading a VM's facts is then needed before a change).
    pub fn guards_vms(&self) -> bool {
        !(self.tags.is_empty()
            && self.names.is_empty()
            && self.folders.is_empty()
            && self.resource_pools.is_empty())
    }

    /// The rule that protects a VM with these facts (see `vsphere::Client::vm_facts`).
    pub fn vm_rule(&self, facts: &serde_json::Value) -> Option<String> {
        let name = facts["name"].as_str().unwrap_or("");
        if let Some(p) = self.names.iter().find(|p| glob(p, name)) {
            return Some(format!("its name matches `{p}`"));
        }
        let folder = facts["folder"].as_str().unwrap_or("");
        if let Some(f) = self.folders.iter().find(|f| *f == folder) {
            return Some(format!("it is in folder `{f}`"));
        }
        let pool = facts["resource_pool"].as_str().unwrap_or("");
        if let Some(r) = self.resource_pools.iter().find(|r| *r == pool) {
            return Some(format!("it is in resource pool `{r}`"));
        }
        if !self.tags.is_empty() && facts.get("tags").is_none() {
            // Unknown tags cannot be shown not to protect it.
            return Some(format!(
                "its tags cannot be read ({}), and protect.tags is set",
                facts["tags_error"].as_str().unwrap_or("unknown error")
            ));
        }
        let tags = facts["tags"].as_object();
        for t in &self.tags {
            let (cat, tag) = match t.split_once('/') {
                Some((c, t)) => (Some(c), t),
                None => (None, t.as_str()),
            };
            let carried = tags.into_iter().flatten().any(|(c, list)| {
                cat.is_none_or(|want| want == c)
                    && list.as_array().into_iter().flatten().any(|x| x == tag)
            });
            if carried {
                return Some(format!("it carries tag `{t}`"));
            }
        }
        None
    }

    /// The rule that protects a host of this name.
    pub fn host_rule(&self, host: &str) -> Option<String> {
        self.hosts
            .iter()
            .find(|p| glob(p, host))
            .map(|p| format!("its name matches `{p}`"))
    }
}

/// `*` matches any run of characters, `?` one; everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The configured vCenters.
#[derive(Clone, Default)]
pub struct Vcenters {
    entries: Arc<BTreeMap<String, Entry>>,
}

struct Entry {
    opts: vsphere::ConnectOptions,
    client: Mutex<Option<Arc<vsphere::Client>>>,
    protect: ProtectConfig,
    budgets: BudgetConfig,
    loop_guard: bool,
}

impl Vcenters {
    /// Validates the configuration (URLs, CA files) without connecting.
    pub fn build(cfg: &BTreeMap<String, VcenterConfig>, diags: &mut Diagnostics) -> Vcenters {
        let mut entries = BTreeMap::new();
        for (name, v) in cfg {
            let url = v.url.value.trim_end_matches('/').to_string();
            match reqwest::Url::parse(&url) {
                Ok(u) if u.scheme() == "https" => {}
                Ok(u) if u.scheme() == "http" && !v.insecure => {
                    diags.at(&v.url.referenced, format!("vcenter `{name}`: url `{url}` would send the password in clear text; use https://, or set `insecure: true` for a lab"));
                    continue;
                }
                Ok(u) if u.scheme() == "http" => {}
                _ => {
                    diags.at(&v.url.referenced, format!("vcenter `{name}`: url `{url}` must be an https:// URL such as https://vc.example.com/sdk"));
                    continue;
                }
            }
            if v.ca_file.is_some() && v.thumbprint.is_some() {
                diags.at(&v.url.referenced, format!("vcenter `{name}`: set `ca_file` or `thumbprint`, not both (a thumbprint trusts exactly one certificate, so the CA file would be ignored)"));
                continue;
            }
            let ca_pem = match &v.ca_file {
                Some(path) => match std::fs::read(path) {
                    Ok(pem) => Some(pem),
                    Err(e) => {
                        diags.at(
                            &v.url.referenced,
                            format!("vcenter `{name}`: cannot read ca_file `{path}`: {e}"),
                        );
                        continue;
                    }
                },
                None => None,
            };
            if let Some(t) = &v.thumbprint {
                if let Err(e) = vsphere::pin::parse_thumbprint(t) {
                    diags.at(&v.url.referenced, format!("vcenter `{name}`: {e}"));
                    continue;
                }
            }
            let url = if url.ends_with("/sdk") {
                url
            } else {
                format!("{url}/sdk")
            };
            entries.insert(
                name.clone(),
                Entry {
                    opts: vsphere::ConnectOptions {
                        url,
                        username: v.username.expose().to_string(),
                        password: v.password.expose().to_string(),
                        insecure: v.insecure,
                        ca_pem,
                        thumbprint: v.thumbprint.clone(),
                        timeout: v
                            .timeout
                            .map(|d| d.0)
                            .unwrap_or(std::time::Duration::from_secs(60)),
                    },
                    client: Mutex::new(None),
                    protect: v.protect.clone(),
                    budgets: v.budgets.clone(),
                    loop_guard: v.loop_guard,
                },
            );
        }
        Vcenters {
            entries: Arc::new(entries),
        }
    }

    /// The names of the configured vCenters, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Whether a vCenter of this name is configured.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The objects protected on a vCenter.
    pub fn protect(&self, name: &str) -> Option<&ProtectConfig> {
        self.entries.get(name).map(|e| &e.protect)
    }

    /// The budgets of a vCenter.
    pub fn budgets(&self, name: &str) -> Option<&BudgetConfig> {
        self.entries.get(name).map(|e| &e.budgets)
    }

    /// The user name reflex logs in to a vCenter as (events it caused carry it), when its
    /// loop guard is on.
    pub fn own_user(&self, name: &str) -> Option<&str> {
        self.entries
            .get(name)
            .filter(|e| e.loop_guard)
            .map(|e| e.opts.username.as_str())
    }

    /// The SDK URL of a vCenter (the `source` of its events).
    pub fn url(&self, name: &str) -> Option<&str> {
        self.entries.get(name).map(|e| e.opts.url.as_str())
    }

    /// The logged-in client, connecting if needed.
    pub async fn client(&self, name: &str) -> Result<Arc<vsphere::Client>, vsphere::Error> {
        let e = self.entries.get(name).ok_or_else(|| {
            vsphere::Error::Invalid(format!("vcenter `{name}` is not configured"))
        })?;
        let mut slot = e.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = Arc::new(vsphere::Client::connect(e.opts.clone()).await?);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Drops a client after a connection failure so that the next use connects afresh.
    pub async fn reset(&self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            *e.client.lock().await = None;
        }
    }
}

/// One change under a cluster's budgets at a time, on every node sharing the store: a
/// change reads its budget, is made, and shows in the inventory before the next one of
/// that cluster reads it. Without it two changes started together (two host alerts at
/// once) would both read "none in maintenance" and both go ahead past the budget.
#[derive(Clone, Default)]
pub struct BudgetLocks {
    local: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<Mutex<()>>>>>,
    store: Option<Arc<dyn crate::store::Store>>,
}

/// Held while a budgeted change is read and made; let go when dropped.
pub struct BudgetLock {
    local: Option<tokio::sync::OwnedMutexGuard<()>>,
    lease: Option<(
        String,
        Arc<dyn crate::store::Store>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl BudgetLocks {
    /// Locks shared with the other nodes of `store` (through its leases).
    pub fn new(store: Arc<dyn crate::store::Store>) -> BudgetLocks {
        BudgetLocks {
            store: Some(store),
            ..Default::default()
        }
    }

    /// Takes the lock on `key` (vCenter and cluster), or `None` while another change under
    /// it runs, on this node or another.
    pub async fn try_lock(
        &self,
        key: &str,
    ) -> Result<Option<BudgetLock>, crate::store::StoreError> {
        let m = self
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone();
        let Ok(local) = m.try_lock_owned() else {
            return Ok(None);
        };
        let Some(store) = &self.store else {
            return Ok(Some(BudgetLock {
                local: Some(local),
                lease: None,
            }));
        };
        let name = format!("budget:{key}");
        if store.hold_lease(&name).await?.is_none() {
            return Ok(None);
        }
        // Renewed while the change runs (a host entering maintenance mode takes minutes).
        let (s, n) = (store.clone(), name.clone());
        let every = (store.lease_time() / 3).max(std::time::Duration::from_millis(100));
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = s.hold_lease(&n).await {
                    tracing::warn!(lease = %n, error = %e, "cannot renew a budget's lease; another node may start a change under it");
                }
            }
        });
        Ok(Some(BudgetLock {
            local: Some(local),
            lease: Some((name, store.clone(), renew)),
        }))
    }
}

impl Drop for BudgetLock {
    fn drop(&mut self) {
        let local = self.local.take();
        if let Some((name, store, renew)) = self.lease.take() {
            renew.abort();
            // This node's next change under the key waits until the lease is given up:
            // otherwise it could renew it just before the release deletes it.
            tokio::spawn(async move {
                if let Err(e) = store.release_lease(&name).await {
                    tracing::warn!(lease = %name, error = %e, "cannot give a budget's lease up; it lapses by itself");
                }
                drop(local);
            });
        }
    }
}

#[cfg(test)]
mod protect_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn globs_and_rules() {
        assert!(glob("prod-*", "prod-db-01"));
        assert!(glob("*-db-??", "prod-db-01"));
        assert!(!glob("prod-*", "dev-prod-1"));
        assert!(glob("*", ""));
        assert!(!glob("a?", "a"));
        let p = ProtectConfig {
            tags: vec!["reflex/never".into(), "frozen".into()],
            names: vec!["vcsa*".into()],
            folders: vec!["Infra".into()],
            resource_pools: vec!["Critical".into()],
            hosts: vec!["esx-0?".into()],
        };
        let vm = |name: &str, tags: serde_json::Value| json!({"name": name, "folder": "vm", "resource_pool": "Resources", "tags": tags});
        assert_eq!(p.vm_rule(&vm("web-1", json!({}))), None);
        assert!(p
            .vm_rule(&vm("vcsa-01", json!({})))
            .unwrap()
            .contains("vcsa*"));
        assert!(p
            .vm_rule(&vm("web-1", json!({"reflex": ["never"]})))
            .unwrap()
            .contains("reflex/never"));
        assert!(p
            .vm_rule(&vm("web-1", json!({"other": ["frozen"]})))
            .unwrap()
            .contains("frozen"));
        assert_eq!(p.vm_rule(&vm("web-1", json!({"other": ["never"]}))), None);
        let mut unknown = vm("web-1", json!({}));
        unknown.as_object_mut().unwrap().remove("tags");
        assert!(p.vm_rule(&unknown).unwrap().contains("cannot be read"));
        assert!(p.host_rule("esx-01").is_some());
        assert!(p.host_rule("esx-100").is_none());
    }

    #[test]
    fn budgets_read_shares_and_refuse_nonsense() {
        let read = |yaml: &str| serde_saphyr::from_str::<BudgetConfig>(yaml);
        let b = read("{hosts_in_maintenance: 1, vms_powered_off: 25%, recheck: 5s}").unwrap();
        assert_eq!(b.hosts_in_maintenance, Some(1));
        assert_eq!(b.vms_powered_off, Some(Percent(25.0)));
        assert_eq!(b.recheck.0, std::time::Duration::from_secs(5));
        assert_eq!(
            read("{vms_powered_off: 12.5}").unwrap().vms_powered_off,
            Some(Percent(12.5))
        );
        assert_eq!(
            read("{}").unwrap().recheck.0,
            std::time::Duration::from_secs(60)
        );
        assert_eq!(
            read("{vms_reconfigured_per_hour: 10%}")
                .unwrap()
                .vms_reconfigured_per_hour,
            Some(Percent(10.0))
        );
        let e = read("{vms_powered_off: lots}").unwrap_err().to_string();
        assert!(e.contains("not a share"), "{e}");
        let e = read("{vms_powered_off: 150%}").unwrap_err().to_string();
        assert!(e.contains("between 0% and 100%"), "{e}");
    }
}
