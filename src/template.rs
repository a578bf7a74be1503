//! Templates (minijinja) with `event` in scope. The environment has no loader and no access
//! to files or the process environment; rendering is bounded by fuel.

use minijinja::{Environment, UndefinedBehavior};

/// What a URL template encodes in a value: everything but RFC 3986's unreserved characters.
const URL_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
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

    /// Compiles a URL template: every value is percent-encoded as it is inserted (only
    /// `A-Z a-z 0-9 - . _ ~` stay as they are), so that event data cannot add path
    /// segments, a query or a fragment; `{{ value | safe }}` inserts it as it is.
    pub fn compile_url(source: &str) -> Result<Template, String> {
        let mut t = Self::compile(source)?;
        let env = Arc::get_mut(&mut t.env).expect("just made");
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::Custom("url".into()));
        env.set_formatter(|out, state, value| {
            let url = matches!(state.auto_escape(), minijinja::AutoEscape::Custom(n) if n == "url");
            if !url {
                return minijinja::escape_formatter(out, state, value);
            }
            if value.is_undefined() || value.is_none() {
                return Ok(());
            }
            let text = value.to_string();
            let written = if value.is_safe() {
                write!(out, "{text}")
            } else {
                write!(
                    out,
                    "{}",
                    percent_encoding::utf8_percent_encode(&text, URL_VALUE)
                )
            };
            written
                .map_err(|_| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "writing"))
        });
        // Recompiled so that the template takes the new auto-escape setting.
        env.remove_template("t");
        env.add_template_owned("t", source.to_string())
            .map_err(|e| format!("invalid template `{source}`: {}", describe(&e)))?;
        Ok(t)
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

#[cfg(test)]
mod url_tests {
    use super::Template;
    use serde_json::json;

    #[test]
    fn url_templates_encode_values_unless_marked_safe() {
        let ctx = json!({"event": {"subject": "a/../../admin?x=1#f", "n": 7}, "secrets": {"hook": "T0/B1/xyz"}});
        let t = Template::compile_url(
            "http://h/vm/{{ event.subject }}/n/{{ event.n }}{{ event.missing }}",
        )
        .unwrap();
        assert_eq!(
            t.render(&ctx).unwrap(),
            "http://h/vm/a%2F..%2F..%2Fadmin%3Fx%3D1%23f/n/7"
        );
        let t = Template::compile_url("https://hooks.slack.com/services/{{ secrets.hook | safe }}")
            .unwrap();
        assert_eq!(
            t.render(&ctx).unwrap(),
            "https://hooks.slack.com/services/T0/B1/xyz"
        );
        // Other templates are unchanged.
        let t = Template::compile("{{ event.subject }}").unwrap();
        assert_eq!(t.render(&ctx).unwrap(), "a/../../admin?x=1#f");
    }
}
