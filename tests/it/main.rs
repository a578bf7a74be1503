//! The integration suite: one binary, a module per area. Servers run in-process on port 0
//! (`reflex::run`), or as the real binary where the process boundary matters (crash, e2e).

mod amqp;
mod approvals;
mod browser;
mod common;
mod config_errors;
mod console;
mod deliveries;
mod e2e_binary;
mod fuzz_regressions;
mod ingest_http;
mod nodes;
mod notify;
mod package;
mod reload;
mod roles;
mod scenarios;
mod secrets;
mod sources;
mod store_faults;
mod tls;
mod vcenter_faults;
mod vsphere;
mod workflow;
