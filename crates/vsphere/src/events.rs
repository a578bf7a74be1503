//! Events: collectors, pages, posting, and the conversion of a vSphere event into the JSON
//! the VMware Event Broker Appliance produces (PascalCase property names).

use crate::client::{Client, MoRef};
use crate::xml::Node;
use crate::Error;
use serde_json::{Map, Value};

/// How far event key `key` is ahead of `of` in vCenter's event chain. Event keys are
/// 32-bit: after 2^31 - 1 the next is -2^31. Compared as serial numbers (RFC 1982), a key
/// less than 2^31 ahead modulo 2^32 is newer, so an order survives the wrap.
pub fn ahead(key: i64, of: i64) -> i64 {
    i64::from((key as i32).wrapping_sub(of as i32))
}

/// Collector page size: the simulator fills smaller first pages wrongly; 1000 is the maximum.
pub const MAX_COUNT: u32 = 1000;

impl Client {
    /// Creates an EventHistoryCollector over the whole inventory (all event classes) with a
    /// page of `page_size` events (at most [`MAX_COUNT`]).
    pub async fn create_event_collector(&self, page_size: u32) -> Result<MoRef, Error> {
        let filter = Node::new("filter").with(
            Node::new("entity")
                .with(self.content.root_folder.node("entity"))
                .with(Node::text("recursion", "all")),
        );
        let r = self
            .call(
                "CreateCollectorForEvents",
                &self.content.event_manager,
                vec![filter],
            )
            .await?;
        let c = r
            .child("returnval")
            .and_then(MoRef::from_node)
            .ok_or_else(|| Error::Protocol {
                method: "CreateCollectorForEvents".into(),
                message: "no collector".into(),
            })?;
        self.call(
            "SetCollectorPageSize",
            &c,
            vec![Node::text(
                "maxCount",
                page_size.clamp(1, MAX_COUNT).to_string(),
            )],
        )
        .await?;
        Ok(c)
    }

    /// The collector's `latestPage` (newest first).
    pub async fn latest_page(&self, collector: &MoRef) -> Result<Vec<Node>, Error> {
        Ok(self
            .property(collector, "latestPage")
            .await?
            .map(|n| n.children)
            .unwrap_or_default())
    }

    /// `ReadNextEvents` (up to `max`).
    pub async fn read_next_events(&self, collector: &MoRef, max: u32) -> Result<Vec<Node>, Error> {
        let r = self
            .call(
                "ReadNextEvents",
                collector,
                vec![Node::text("maxCount", max.to_string())],
            )
            .await?;
        Ok(r.children
            .into_iter()
            .filter(|c| c.name == "returnval")
            .collect())
    }

    /// The events after `after` (a key), as far back as vCenter still holds them and at
    /// most about `limit`: the latest page of a fresh collector, then older pages with
    /// `ReadPreviousEvents`, until one reaches back to `after`. For filling a gap when more
    /// events happened between two reads than one page holds. Unordered.
    pub async fn events_since(&self, after: i64, limit: usize) -> Result<Vec<Node>, Error> {
        let c = self.create_event_collector(MAX_COUNT).await?;
        let result = async {
            let mut events = self.latest_page(&c).await?;
            // The scrollable view just before the latest page: reading back goes older.
            self.call("ResetCollector", &c, vec![]).await?;
            let reaches =
                |events: &[Node]| events.iter().filter_map(key).any(|k| ahead(k, after) <= 1);
            while events.len() < limit && !reaches(&events) {
                let r = self
                    .call(
                        "ReadPreviousEvents",
                        &c,
                        vec![Node::text("maxCount", MAX_COUNT.to_string())],
                    )
                    .await?;
                let before = events.len();
                events.extend(r.children.into_iter().filter(|c| c.name == "returnval"));
                events.sort_by_key(|e| key(e).map(|k| ahead(k, after)));
                events.dedup_by_key(|e| key(e));
                if events.len() == before {
                    break;
                }
            }
            events.retain(|e| key(e).is_some_and(|k| ahead(k, after) > 0));
            Ok(events)
        }
        .await;
        self.destroy_collector(&c).await;
        result
    }

    /// `EventManager.QueryEvents`: the newest events (at most [`MAX_COUNT`]) of the classes
    /// `type_ids` about `entity` and everything in it, created at or after `since`. The
    /// simulator ignores a filter's time, so the time is checked here as well.
    pub async fn query_events(
        &self,
        entity: &MoRef,
        type_ids: &[&str],
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<Node>, Error> {
        // EventFilterSpec's elements in the order of its schema.
        let mut filter = Node::new("filter")
            .with(
                Node::new("entity")
                    .with(entity.node("entity"))
                    .with(Node::text("recursion", "all")),
            )
            .with(Node::new("time").with(Node::text(
                "beginTime",
                since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            )))
            .with(Node::text("disableFullMessage", "true"));
        for t in type_ids {
            filter = filter.with(Node::text("eventTypeId", *t));
        }
        filter = filter.with(Node::text("maxCount", MAX_COUNT.to_string()));
        let r = self
            .call("QueryEvents", &self.content.event_manager, vec![filter])
            .await?;
        Ok(r.children
            .into_iter()
            .filter(|c| c.name == "returnval")
            .filter(|e| {
                e.child_text("createdTime")
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .is_none_or(|t| t >= since)
            })
            .collect())
    }

    /// Destroys a collector (best effort).
    pub async fn destroy_collector(&self, collector: &MoRef) {
        let _ = self.call("DestroyCollector", collector, vec![]).await;
    }

    /// Posts an event (`EventManager.PostEvent`), e.g. an `AlarmStatusChangedEvent`.
    pub async fn post_event(&self, event: Node) -> Result<(), Error> {
        self.call(
            "PostEvent",
            &self.content.event_manager,
            vec![Node {
                name: "eventToPost".into(),
                ..event
            }],
        )
        .await?;
        Ok(())
    }
}

/// The event's key.
pub fn key(event: &Node) -> Option<i64> {
    event.child_text("key")?.parse().ok()
}

/// The event's class: `xsi:type`, e.g. `VmPoweredOffEvent`.
pub fn class(event: &Node) -> String {
    event.xsi_type.clone().unwrap_or_else(|| event.name.clone())
}

/// Fields whose text is a number in vSphere's event types.
const INTEGER_FIELDS: &[&str] = &[
    "key",
    "chainId",
    "changeTag",
    "numCPUs",
    "memoryMB",
    "port",
    "slotNumber",
    "unitNumber",
    "controllerKey",
];

fn pascal(name: &str) -> String {
    let mut c = name.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

fn scalar(name: &str, n: &Node) -> Value {
    let t = n.text.as_str();
    match n.xsi_type.as_deref() {
        Some("xsd:int" | "int" | "long" | "short" | "xsd:long") => t
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| t.into()),
        Some("boolean" | "xsd:boolean") => Value::Bool(t == "true"),
        _ if INTEGER_FIELDS.contains(&name) => t
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| t.into()),
        _ if t == "true" || t == "false" => Value::Bool(t == "true"),
        _ => Value::String(t.to_string()),
    }
}

/// Converts an XML node into JSON with PascalCase names: a managed object reference becomes
/// `{"Type": …, "Value": …}`, repeated elements become arrays.
pub fn to_json(n: &Node) -> Value {
    if let Some(kind) = &n.type_attr {
        if n.children.is_empty() {
            return serde_json::json!({"Type": kind, "Value": n.text});
        }
    }
    if n.children.is_empty() {
        return scalar(&n.name, n);
    }
    let mut m = Map::new();
    let mut order: Vec<&str> = Vec::new();
    for c in &n.children {
        if !order.contains(&c.name.as_str()) {
            order.push(&c.name);
        }
    }
    for name in order {
        let items: Vec<&Node> = n.children.iter().filter(|c| c.name == name).collect();
        let v = if items.len() == 1
            && !n
                .xsi_type
                .as_deref()
                .is_some_and(|t| t.starts_with("ArrayOf"))
        {
            to_json(items[0])
        } else {
            Value::Array(items.iter().map(|c| to_json(c)).collect())
        };
        m.insert(pascal(name), v);
    }
    Value::Object(m)
}

/// Converts an event as the Event Broker Appliance does: `data` of its CloudEvent.
pub fn event_data(event: &Node) -> Value {
    to_json(event)
}

/// A `GeneralUserEvent` carrying `message`, for `PostEvent` (vCenter fills in the key
/// and the time).
pub fn user_event(message: &str) -> Node {
    Node::new("event")
        .typed("GeneralUserEvent")
        .with(Node::text("key", "0"))
        .with(Node::text("chainId", "0"))
        .with(Node::text("createdTime", "2026-01-01T00:00:00Z"))
        .with(Node::text("userName", ""))
        .with(Node::text("fullFormattedMessage", message))
        .with(Node::text("message", message))
}

/// An `AlarmStatusChangedEvent` on a VM, for `PostEvent` (alarms cannot be triggered on the
/// simulator; tests and drills post this instead).
pub fn alarm_status_changed(
    vm: &MoRef,
    vm_name: &str,
    alarm_name: &str,
    from: &str,
    to: &str,
) -> Node {
    Node::new("event")
        .typed("AlarmStatusChangedEvent")
        .with(Node::text("key", "0"))
        .with(Node::text("chainId", "0"))
        .with(Node::text("createdTime", chrono::Utc::now().to_rfc3339()))
        .with(Node::text("userName", ""))
        .with(
            Node::new("vm")
                .with(Node::text("name", vm_name))
                .with(vm.node("vm")),
        )
        .with(Node::text(
            "fullFormattedMessage",
            format!("Alarm '{alarm_name}' on {vm_name} changed from {from} to {to}"),
        ))
        .with(
            Node::new("alarm")
                .with(Node::text("name", alarm_name))
                .with(Node::moref("alarm", "Alarm", "alarm-1")),
        )
        .with(
            Node::new("source")
                .with(Node::text("name", vm_name))
                .with(vm.node("entity")),
        )
        .with(
            Node::new("entity")
                .with(Node::text("name", vm_name))
                .with(vm.node("entity")),
        )
        .with(Node::text("from", from))
        .with(Node::text("to", to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alarm_event_converts_like_the_appliance() {
        let xml = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/samples/18-ReadNextEvents-AlarmStatusChangedEvent.response.xml"
        ))
        .unwrap();
        let env = Node::parse(&xml).unwrap();
        let ev = env
            .path(&["Body", "ReadNextEventsResponse", "returnval"])
            .unwrap();
        assert_eq!(class(ev), "AlarmStatusChangedEvent");
        let j = event_data(ev);
        assert!(j["Key"].is_i64(), "{j}");
        assert_eq!(j["Alarm"]["Name"], "VM CPU Usage");
        assert_eq!(j["Alarm"]["Alarm"]["Type"], "Alarm");
        assert_eq!(j["From"], "yellow");
        assert_eq!(j["To"], "red");
        assert_eq!(j["Vm"]["Vm"]["Type"], "VirtualMachine");
        assert!(j["CreatedTime"].is_string());
    }
}
