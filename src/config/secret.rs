//! Secrets in the configuration: `${env:NAME}`, `${file:PATH}` or a literal, never printed.

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::fmt;

/// A secret value resolved at load time. `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret's value; call only where it is used (a header, a key), never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A secret from a literal (tests and generated keys).
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Resolves `${env:NAME}` or `${file:PATH}`; anything else is taken literally.
pub fn resolve(raw: &str) -> Result<String, String> {
    let Some(inner) = raw.strip_prefix("${").and_then(|r| r.strip_suffix('}')) else {
        return Ok(raw.to_string());
    };
    if let Some(name) = inner.strip_prefix("env:") {
        return std::env::var(name).map_err(|_| {
            format!("environment variable `{name}` is not set (referenced as `{raw}`); export it before starting reflex")
        });
    }
    if let Some(path) = inner.strip_prefix("file:") {
        return std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
            .map_err(|e| format!("cannot read secret file `{path}`: {e}"));
    }
    Err(format!(
        "unknown secret reference `{raw}`: expected `${{env:NAME}}` or `${{file:PATH}}`"
    ))
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        let value = resolve(&raw).map_err(serde::de::Error::custom)?;
        if value.is_empty() {
            // An empty token or key would sign or authenticate with nothing.
            return Err(serde::de::Error::custom(if raw.is_empty() {
                "the secret is empty; give it a value (or remove the setting)".to_string()
            } else {
                format!("the secret `{raw}` resolves to an empty value; give it a value (or remove the setting)")
            }));
        }
        Ok(Secret(value))
    }
}

impl JsonSchema for Secret {
    fn schema_name() -> Cow<'static, str> {
        "Secret".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A secret: `${env:NAME}`, `${file:PATH}` or a literal value"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_env_and_file_and_redacts() {
        std::env::set_var("REFLEX_TEST_SECRET_X", "s3cret");
        assert_eq!(resolve("${env:REFLEX_TEST_SECRET_X}").unwrap(), "s3cret");
        assert!(resolve("${env:REFLEX_NOT_SET_123}")
            .unwrap_err()
            .contains("not set"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "abc\n").unwrap();
        assert_eq!(
            resolve(&format!("${{file:{}}}", p.display())).unwrap(),
            "abc"
        );
        assert!(resolve("${vault:x}").is_err());
        assert_eq!(format!("{:?}", Secret::new("x")), "<redacted>");
    }

    #[test]
    fn an_empty_secret_is_refused() {
        std::env::set_var("REFLEX_TEST_SECRET_EMPTY", "");
        let e = serde_json::from_str::<Secret>("\"${env:REFLEX_TEST_SECRET_EMPTY}\"").unwrap_err();
        assert!(e.to_string().contains("resolves to an empty value"), "{e}");
        let e = serde_json::from_str::<Secret>("\"\"").unwrap_err();
        assert!(e.to_string().contains("the secret is empty"), "{e}");
        assert_eq!(
            serde_json::from_str::<Secret>("\"k\"").unwrap().expose(),
            "k"
        );
    }
}
