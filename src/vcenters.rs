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
}

/// The configured vCenters.
#[derive(Clone, Default)]
pub struct Vcenters {
    entries: Arc<BTreeMap<String, Entry>>,
}

struct Entry {
    opts: vsphere::ConnectOptions,
    client: Mutex<Option<Arc<vsphere::Client>>>,
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
                },
            );
        }
        Vcenters {
            entries: Arc::new(entries),
        }
    }

    /// Whether a vCenter of this name is configured.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
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
