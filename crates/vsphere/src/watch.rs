//! Property watches: a property collector of their own with one filter, and
//! `WaitForUpdatesEx` (a long poll), so that a change is seen when it happens rather than at
//! the next poll.

use crate::client::{Client, MoRef};
use crate::xml::Node;
use crate::Error;
use std::time::Duration;

/// A watch on some properties of one object; see [`Client::watch`].
#[derive(Debug)]
pub struct Watch {
    collector: MoRef,
    version: String,
}

impl Client {
    /// Starts watching `props` of `obj`. The first [`Client::wait_for_change`] answers at
    /// once (with the current values); each later one when something changed.
    pub async fn watch(&self, obj: &MoRef, props: &[&str]) -> Result<Watch, Error> {
        let r = self
            .call(
                "CreatePropertyCollector",
                &self.content.property_collector,
                vec![],
            )
            .await?;
        let collector = r
            .child("returnval")
            .and_then(MoRef::from_node)
            .ok_or_else(|| Error::Protocol {
                method: "CreatePropertyCollector".into(),
                message: "no property collector in the answer".into(),
            })?;
        let mut prop_set = Node::new("propSet").with(Node::text("type", &obj.kind));
        for p in props {
            prop_set = prop_set.with(Node::text("pathSet", *p));
        }
        let spec = Node::new("spec")
            .with(prop_set)
            .with(Node::new("objectSet").with(obj.node("obj")));
        let filter = self
            .call(
                "CreateFilter",
                &collector,
                vec![spec, Node::text("partialUpdates", "false")],
            )
            .await;
        if let Err(e) = filter {
            let _ = self
                .call("DestroyPropertyCollector", &collector, vec![])
                .await;
            return Err(e);
        }
        Ok(Watch {
            collector,
            version: String::new(),
        })
    }

    /// Waits up to `max_wait` (whole seconds, at least one) for a change of the watched
    /// properties; `true` when one came, `false` when the wait ran out.
    pub async fn wait_for_change(&self, w: &mut Watch, max_wait: Duration) -> Result<bool, Error> {
        let secs = max_wait.as_secs().max(1);
        let r = self
            .call(
                "WaitForUpdatesEx",
                &w.collector,
                vec![
                    Node::text("version", &w.version),
                    Node::new("options").with(Node::text("maxWaitSeconds", secs.to_string())),
                ],
            )
            .await?;
        match r.child("returnval") {
            Some(update) => {
                if let Some(v) = update.child_text("version") {
                    w.version = v.to_string();
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Stops a watch (best effort).
    pub async fn unwatch(&self, w: Watch) {
        let _ = self
            .call("DestroyPropertyCollector", &w.collector, vec![])
            .await;
    }
}
