//! Events are CloudEvents 1.0 (the `cloudevents-sdk` model). This module adds what reflex
//! needs around them: attribute lookup by name, the JSON view templates and expressions see,
//! and the envelope that travels through the store.

use cloudevents::event::{AttributeValue, ExtensionValue};
use cloudevents::{AttributesReader, Data, Event};
use serde_json::{json, Map, Value};

/// The extension that carries the routing key a source mapped.
pub const ROUTING_KEY_EXT: &str = "routingkey";

/// An attribute's value as a string, by CloudEvents name (`type`, `subject`, an extension…).
pub fn attribute(event: &Event, name: &str) -> Option<String> {
    match name {
        "id" => Some(event.id().to_string()),
        "source" => Some(event.source().to_string()),
        "type" => Some(event.ty().to_string()),
        "specversion" => Some(event.specversion().to_string()),
        "subject" => event.subject().map(str::to_string),
        "datacontenttype" => event.datacontenttype().map(str::to_string),
        "dataschema" => event.dataschema().map(|u| u.to_string()),
        "time" => event.time().map(|t| t.to_rfc3339()),
        ext => event.extension(ext).map(ext_to_string),
    }
}

fn ext_to_string(v: &ExtensionValue) -> String {
    match v {
        ExtensionValue::String(s) => s.clone(),
        ExtensionValue::Boolean(b) => b.to_string(),
        ExtensionValue::Integer(i) => i.to_string(),
    }
}

/// The event's data as JSON: parsed when it is JSON, a string otherwise, null when absent.
pub fn data_json(event: &Event) -> Value {
    match event.data() {
        None => Value::Null,
        Some(Data::Json(v)) => v.clone(),
        Some(Data::String(s)) => {
            serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
        }
        Some(Data::Binary(b)) => match serde_json::from_slice(b) {
            Ok(v) => v,
            Err(_) => Value::String(String::from_utf8_lossy(b).into_owned()),
        },
    }
}

/// The view of an event that templates and expressions get: attributes, extensions and `data`.
pub fn view(event: &Event) -> Value {
    let mut m = Map::new();
    for (name, value) in event.iter() {
        let v = match value {
            AttributeValue::Boolean(b) => json!(b),
            AttributeValue::Integer(i) => json!(i),
            other => Value::String(other.to_string()),
        };
        m.insert(name.to_string(), v);
    }
    m.insert("data".into(), data_json(event));
    Value::Object(m)
}

/// Stores JSON data as JSON (not base64) when the content type says it is JSON, so that the
/// API, templates and structured deliveries show it as sent.
pub fn normalize(event: &mut Event) {
    let is_json = event
        .datacontenttype()
        .map(|ct| {
            let ct = ct.split(';').next().unwrap_or("").trim();
            ct == "application/json" || ct.ends_with("+json") || ct == "text/json"
        })
        .unwrap_or(false);
    if !is_json {
        return;
    }
    let parsed = match event.data() {
        Some(Data::Binary(b)) => serde_json::from_slice::<Value>(b).ok(),
        Some(Data::String(s)) => serde_json::from_str::<Value>(s).ok(),
        _ => None,
    };
    if let Some(v) = parsed {
        event.set_data_unchecked(v);
    }
}

/// Serializes an event in the structured JSON format (the store's format).
pub fn to_json(event: &Event) -> String {
    serde_json::to_string(event).expect("a CloudEvent always serializes")
}

/// Reads an event back from the store's format.
pub fn from_json(text: &str) -> Result<Event, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::{EventBuilder, EventBuilderV10};

    #[test]
    fn view_has_attributes_extensions_and_data() {
        let e = EventBuilderV10::new()
            .id("1")
            .source("/s")
            .ty("t.x")
            .subject("vm-1")
            .extension("routingkey", "a.b")
            .data("application/json", json!({"k": 2}))
            .build()
            .unwrap();
        let v = view(&e);
        assert_eq!(v["type"], "t.x");
        assert_eq!(v["routingkey"], "a.b");
        assert_eq!(v["data"]["k"], 2);
        assert_eq!(attribute(&e, "subject").as_deref(), Some("vm-1"));
        assert_eq!(attribute(&e, "routingkey").as_deref(), Some("a.b"));
        assert_eq!(attribute(&e, "nope"), None);
        let back = from_json(&to_json(&e)).unwrap();
        assert_eq!(back, e);
    }
}

/// Deepest nesting accepted in an event's data: the stored event wraps it in two more
/// levels, well under serde_json's limit of 128 for reading it back.
pub const MAX_DEPTH: usize = 64;

/// How deep `v` nests (a scalar is 0, `[1]` is 1), counting no further than `stop` (which
/// also bounds the recursion). Runs on every ingested event: no allocation.
pub fn json_depth(v: &serde_json::Value, stop: usize) -> usize {
    if stop == 0 {
        return 0;
    }
    let below = |items: &mut dyn Iterator<Item = &serde_json::Value>| {
        let mut deepest = 0;
        for c in items {
            deepest = deepest.max(json_depth(c, stop - 1));
            if deepest + 1 >= stop {
                break;
            }
        }
        deepest + 1
    };
    match v {
        serde_json::Value::Array(a) => below(&mut a.iter()),
        serde_json::Value::Object(o) => below(&mut o.values()),
        _ => 0,
    }
}

#[cfg(test)]
mod depth_tests {
    use super::json_depth;
    use serde_json::json;

    #[test]
    fn depth_counts_the_deepest_branch() {
        assert_eq!(json_depth(&json!(1), 99), 0);
        assert_eq!(json_depth(&json!([]), 99), 1);
        assert_eq!(json_depth(&json!({"a": [1, {"b": [[]]}], "c": 2}), 99), 5);
        assert_eq!(json_depth(&json!([[[[[[]]]]]]), 3), 3);
    }
}
