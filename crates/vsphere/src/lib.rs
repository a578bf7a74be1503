//! A client for the vSphere Web Services API (SOAP, `urn:vim25`) and the REST tagging API,
//! with no dependency on reflex. XML is built and parsed with quick-xml; SOAP faults become
//! [`Error::Fault`] with the fault's name; sessions are re-established once when they expire.

mod client;
pub mod events;
pub mod inventory;
pub mod journal;
pub mod pin;
mod rest;
pub mod sim;
pub mod vm;
pub mod watch;
pub mod xml;

pub use client::{Client, ConnectOptions, MoRef, ServiceContent};
pub use xml::Node;

/// What went wrong talking to vCenter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// vCenter answered a SOAP fault (e.g. `InvalidLogin`, `ManagedObjectNotFound`,
    /// `ConcurrentAccess`, `InvalidState`, `InvalidPowerState`).
    #[error("{method}: vCenter fault {name}: {message}")]
    Fault {
        /// The call.
        method: String,
        /// The fault's type name.
        name: String,
        /// Its message.
        message: String,
    },
    /// A task ended in error.
    #[error("task {task} ({what}) failed: {name}: {message}")]
    Task {
        /// The task's managed object id.
        task: String,
        /// What the task did.
        what: String,
        /// The fault's type name.
        name: String,
        /// Its message.
        message: String,
    },
    /// The connection failed (refused, reset, TLS, timeout).
    #[error("{0}")]
    Connection(String),
    /// vCenter answered something that is not the expected SOAP or JSON.
    #[error("unexpected answer to {method}: {message}")]
    Protocol {
        /// The call.
        method: String,
        /// What was wrong.
        message: String,
    },
    /// A VM, host or other object was not found.
    #[error("{0} not found")]
    NotFound(String),
    /// The request is invalid (bad argument, more than one match…).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// The fault name, if vCenter reported one.
    pub fn fault_name(&self) -> Option<&str> {
        match self {
            Error::Fault { name, .. } | Error::Task { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Whether retrying later may succeed (connection trouble, busy objects, conflicts).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connection(_) => true,
            Error::Fault { name, .. } | Error::Task { name, .. } => matches!(
                name.as_str(),
                "TaskInProgress"
                    | "ConcurrentAccess"
                    | "HostCommunication"
                    | "NotAuthenticated"
                    | "SystemError"
                    | "RequestCanceled"
                    | "Timedout"
            ),
            Error::Protocol { .. } => true,
            Error::NotFound(_) | Error::Invalid(_) => false,
        }
    }
}
