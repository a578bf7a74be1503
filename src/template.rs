//! Templates (minijinja) with `event` in scope. The environment has no loader and no access
//! to files or the process environment; rendering is bounded by fuel.

use minijinja::{Environment, UndefinedBehavior};
use std::sync::Arc;

/// Fuel per render: enough for real templates, a stop for runaway loops.
const FUEL: u64 = 50_000;

/// A compiled template.
#[derive(Clone)]
pub struct Template {
    env: Arc<Environment<'static>>,
    source: Arc<str>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Template({:?})", self.source)
    }
}

impl Template {
    /// Compiles `source`; the error says what is wrong with it.
    pub fn compile(source: &str) -> Result<Template, String> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        env.add_template_owned("t", source.to_string())
            .map_err(|e| format!("invalid template `{source}`: {}", describe(&e)))?;
        Ok(Template {
            env: Arc::new(env),
            source: source.into(),
        })
    }

    /// Renders with `ctx` (an object such as `{"event": …}`).
    pub fn render(&self, ctx: &serde_json::Value) -> Result<String, String> {
        self.render_value(&Self::context(ctx))
    }

    /// Converts a context once, for rendering several templates with it.
    pub fn context(ctx: &serde_json::Value) -> minijinja::Value {
        minijinja::Value::from(minijinja::value::Serde(ctx))
    }

    /// Renders with a context made by [`Template::context`].
    pub fn render_value(&self, ctx: &minijinja::Value) -> Result<String, String> {
        let t = self.env.get_template("t").map_err(|e| e.to_string())?;
        t.render(ctx)
            .map_err(|e| format!("template `{}` failed: {}", self.source, describe(&e)))
    }

    /// The template text as written.
    pub fn source(&self) -> &str {
        &self.source
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = e.kind().to_string();
    if let Some(d) = e.detail() {
        s.push_str(": ");
        s.push_str(d);
    }
    if let Some(l) = e.line() {
        s.push_str(&format!(" (template line {l})"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_event_fields() {
        let t =
            Template::compile("vm={{ event.data.vm }} sev={{ event.data.sev | upper }}").unwrap();
        let out = t
            .render(&json!({"event": {"data": {"vm": "web-1", "sev": "red"}}}))
            .unwrap();
        assert_eq!(out, "vm=web-1 sev=RED");
    }

    #[test]
    fn missing_fields_render_empty() {
        let t = Template::compile("[{{ event.data.nope.deeper }}]").unwrap();
        assert_eq!(t.render(&json!({"event": {}})).unwrap(), "[]");
    }

    #[test]
    fn syntax_errors_are_reported() {
        let e = Template::compile("{{ event.data ").unwrap_err();
        assert!(e.contains("syntax error"), "{e}");
    }

    #[test]
    fn no_filesystem_or_env_access() {
        // No loader: include/import cannot read files.
        let t = Template::compile("{% include '/etc/passwd' %}").unwrap();
        assert!(t.render(&json!({})).is_err());
        // No `env` global.
        let t = Template::compile("{{ env.HOME }}").unwrap();
        assert_eq!(t.render(&json!({})).unwrap(), "");
    }

    #[test]
    fn runaway_loops_run_out_of_fuel() {
        let t = Template::compile(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        )
        .unwrap();
        let e = t.render(&json!({})).unwrap_err();
        assert!(e.contains("fuel"), "{e}");
    }
}
