//! The configuration reference (`docs/reference.md`), written from the JSON Schema of the
//! configuration types, whose descriptions are their doc comments: it cannot drift from
//! what reflex reads (a test compares the committed file with this output).

use serde_json::{Map, Value};
use std::fmt::Write;

/// The reference as Markdown.
pub fn markdown() -> String {
    let schema = super::json_schema();
    let defs = schema["$defs"].as_object().cloned().unwrap_or_default();
    let mut out = String::new();
    out.push_str("# Configuration reference\n\n");
    out.push_str(
        "Written by `reflex docs` from the configuration types (their doc comments are the\n",
    );
    out.push_str(
        "descriptions); `cargo test` fails when this file is stale. Durations are written like\n",
    );
    out.push_str("`30s`, `10m`, `1h`; sizes like `64KiB`; secrets as `${env:NAME}`, `${file:PATH}` or a literal.\n\n");
    out.push_str("## The file\n\n");
    table(&mut out, &schema, &defs);
    for (title, def, what) in [
        ("Sources", "SourceConfig", "source"),
        ("Actions", "ActionConfig", "action"),
    ] {
        let _ = writeln!(out, "## {title}\n");
        if let Some(d) = text(&defs[def]["description"]) {
            let _ = writeln!(out, "{d}\n");
        }
        for variant in defs[def]["oneOf"].as_array().into_iter().flatten() {
            let kind = variant["properties"]["type"]["const"]
                .as_str()
                .or_else(|| variant["properties"]["type"]["enum"][0].as_str())
                .unwrap_or("?");
            let _ = writeln!(out, "### {what} `type: {kind}`\n");
            if let Some(d) = text(&variant["description"]) {
                let _ = writeln!(out, "{d}\n");
            }
            table(&mut out, variant, &defs);
        }
    }
    out.push_str("## Definitions\n\n");
    out.push_str("The types the tables above name, in alphabetical order.\n\n");
    for (name, def) in &defs {
        if name == "SourceConfig" || name == "ActionConfig" {
            continue;
        }
        let _ = writeln!(out, "### {name}\n");
        if let Some(d) = text(&def["description"]) {
            let _ = writeln!(out, "{d}\n");
        }
        if def.get("properties").is_some() {
            table(&mut out, def, &defs);
        } else if let Some(alts) = def
            .get("oneOf")
            .or_else(|| def.get("anyOf"))
            .and_then(Value::as_array)
        {
            for a in alts {
                let label = a["const"]
                    .as_str()
                    .map(|c| format!("`{c}`"))
                    .or_else(|| {
                        a["properties"]["type"]["const"]
                            .as_str()
                            .map(|c| format!("`type: {c}`"))
                    })
                    .or_else(|| {
                        a["enum"].as_array().map(|e| {
                            e.iter()
                                .map(|v| format!("`{}`", v.as_str().unwrap_or("")))
                                .collect::<Vec<_>>()
                                .join(", ")
                        })
                    })
                    .unwrap_or_else(|| type_of(a));
                let d = text(&a["description"])
                    .unwrap_or_default()
                    .replace('\n', " ");
                let _ = writeln!(out, "- {label}{}{d}", if d.is_empty() { "" } else { ": " });
                if a.get("properties").is_some() {
                    out.push('\n');
                    table(&mut out, a, &defs);
                }
            }
            out.push('\n');
        } else {
            let _ = writeln!(out, "Written as {}.\n", type_of(def));
        }
    }
    out
}

fn text(v: &Value) -> Option<String> {
    v.as_str()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// A table of an object schema's options (all but `type`, which names the kind).
fn table(out: &mut String, schema: &Value, _defs: &Map<String, Value>) {
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    let required: Vec<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let rows: Vec<_> = props.iter().filter(|(k, _)| *k != "type").collect();
    if rows.is_empty() {
        out.push_str("No options.\n\n");
        return;
    }
    out.push_str("| option | type | required | default | description |\n|---|---|---|---|---|\n");
    for (name, p) in rows {
        let default = p
            .get("default")
            .map(|d| format!("`{d}`"))
            .unwrap_or_default();
        let desc = text(&p["description"])
            .unwrap_or_default()
            .replace('\n', " ")
            .replace('|', "\\|");
        let _ = writeln!(
            out,
            "| `{name}` | {} | {} | {default} | {desc} |",
            type_of(p).replace('|', "\\|"),
            if required.contains(&name.as_str()) {
                "yes"
            } else {
                ""
            }
        );
    }
    out.push('\n');
}

/// A schema's type in words: `string`, `list of Filter`, `Duration`, `string or null`.
fn type_of(p: &Value) -> String {
    if let Some(r) = p["$ref"].as_str() {
        return r.rsplit('/').next().unwrap_or(r).to_string();
    }
    if let Some(alts) = p
        .get("anyOf")
        .or_else(|| p.get("oneOf"))
        .and_then(Value::as_array)
    {
        let parts: Vec<String> = alts
            .iter()
            .filter(|a| a["type"] != "null")
            .map(type_of)
            .collect();
        return parts.join(" or ");
    }
    if let Some(e) = p["enum"].as_array() {
        return e
            .iter()
            .map(|v| format!("`{}`", v.as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(", ");
    }
    let one = |t: &str| match t {
        "array" => format!(
            "list of {}",
            p.get("items")
                .map(type_of)
                .unwrap_or_else(|| "values".into())
        ),
        "object" => match p.get("additionalProperties") {
            Some(a) if a.is_object() => format!("map of {}", type_of(a)),
            _ => "object".into(),
        },
        other => other.to_string(),
    };
    match &p["type"] {
        Value::String(t) => one(t),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .map(one)
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "any".into(),
    }
}
