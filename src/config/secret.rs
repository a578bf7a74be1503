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
        let value = value.into();
        remember(&value);
        Secret(value)
    }
}

/// Every secret value read so far (and its URL-encoded forms), so that text about to be
/// logged, recorded or answered can be masked by value wherever a secret ended up in it
/// (a URL in a driver's error, a program's output).
static KNOWN: std::sync::RwLock<Vec<String>> = std::sync::RwLock::new(Vec::new());

/// Secrets shorter than this are not masked (they would mask ordinary words).
const MIN_MASKED: usize = 4;

fn remember(value: &str) {
    if value.len() < MIN_MASKED {
        return;
    }
    let encoded = [
        value.to_string(),
        percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
            .to_string(),
        url::form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>(),
    ];
    let mut known = KNOWN.write().unwrap_or_else(|e| e.into_inner());
    for v in encoded {
        if !known.contains(&v) {
            known.push(v);
        }
    }
    // Longest first: a secret that contains another is masked whole.
    known.sort_by_key(|v| std::cmp::Reverse(v.len()));
}

/// `text` with every known secret value replaced by `<redacted>`.
pub fn redact(text: &str) -> std::borrow::Cow<'_, str> {
    let known = KNOWN.read().unwrap_or_else(|e| e.into_inner());
    if !known.iter().any(|v| text.contains(v.as_str())) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = text.to_string();
    for v in known.iter() {
        if out.contains(v.as_str()) {
            out = out.replace(v.as_str(), "<redacted>");
        }
    }
    std::borrow::Cow::Owned(out)
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
        remember(&value);
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
    fn known_secrets_are_masked_by_value_and_url_encoded() {
        let _ = serde_json::from_str::<Secret>("\"tok/en+with space\"").unwrap();
        let text = "GET http://h/tok%2Fen%2Bwith%20space/x failed; body tok/en+with space; form tok%2Fen%2Bwith+space";
        assert_eq!(
            redact(text),
            "GET http://h/<redacted>/x failed; body <redacted>; form <redacted>"
        );
        assert!(matches!(
            redact("nothing here"),
            std::borrow::Cow::Borrowed(_)
        ));
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
