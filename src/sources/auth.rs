//! Request authentication for HTTP sources: none, bearer token, HMAC-SHA256 of the body in a
//! named header, or Standard Webhooks. Every comparison is constant-time.

use super::util::Rejection;
use crate::config::{Duration, Secret};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use hmac::{KeyInit, Mac};
use schemars::JsonSchema;
use serde::Deserialize;
use subtle::ConstantTimeEq;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// How a source authenticates requests.
#[derive(Debug, Clone, Deserialize, JsonSchema, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthConfig {
    /// No authentication.
    #[default]
    None,
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The expected token.
        token: Secret,
    },
    /// HMAC-SHA256 of the raw body, hex or base64, in a named header.
    Hmac {
        /// Header carrying the signature, e.g. `X-Signature`.
        header: String,
        /// The shared secret.
        secret: Secret,
        /// Text before the signature in the header, e.g. `sha256=`.
        #[serde(default)]
        prefix: String,
        /// `hex` (default) or `base64`.
        #[serde(default)]
        encoding: Encoding,
    },
    /// Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
    StandardWebhooks {
        /// `whsec_…` (base64 key) or a raw key.
        secret: Secret,
        /// Largest accepted clock difference; 5 minutes by default.
        tolerance: Option<Duration>,
    },
}

/// Signature encoding.
#[derive(Debug, Deserialize, JsonSchema, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// Lowercase or uppercase hex.
    #[default]
    Hex,
    /// Standard base64.
    Base64,
}

fn unauthorized(msg: impl Into<String>) -> Rejection {
    Rejection::new(StatusCode::UNAUTHORIZED, "unauthorized", msg)
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

/// The key bytes of a Standard Webhooks secret.
pub fn standard_webhooks_key(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_else(|_| secret.as_bytes().to_vec()),
        None => secret.as_bytes().to_vec(),
    }
}

impl AuthConfig {
    /// What can be checked before the body is read: the whole of a bearer token, and the
    /// presence (and freshness) of a signature's headers. A request that fails here is
    /// answered `401` without its body being read.
    pub fn verify_headers(&self, headers: &HeaderMap) -> Result<(), Rejection> {
        let present = |name: &str| {
            if headers.contains_key(name) {
                Ok(())
            } else {
                Err(unauthorized(format!("missing `{name}` header")))
            }
        };
        match self {
            AuthConfig::None => Ok(()),
            AuthConfig::Bearer { .. } => self.verify(headers, b""),
            AuthConfig::Hmac { header, .. } => present(header),
            AuthConfig::StandardWebhooks { tolerance, .. } => {
                present("webhook-id")?;
                present("webhook-signature")?;
                let t: i64 = headers
                    .get("webhook-timestamp")
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| unauthorized("missing `webhook-timestamp` header"))?
                    .parse()
                    .map_err(|_| unauthorized("`webhook-timestamp` is not a Unix timestamp"))?;
                let tol = tolerance
                    .map(|d| d.0)
                    .unwrap_or(std::time::Duration::from_secs(300))
                    .as_secs() as i64;
                if (chrono::Utc::now().timestamp() - t).abs() > tol {
                    return Err(unauthorized(format!(
                        "`webhook-timestamp` is more than {tol}s away from now"
                    )));
                }
                Ok(())
            }
        }
    }

    /// Whether the scheme signs the body, so that [`AuthConfig::verify`] must see it
    /// (the others are settled by [`AuthConfig::verify_headers`]).
    pub fn signs_body(&self) -> bool {
        matches!(
            self,
            AuthConfig::Hmac { .. } | AuthConfig::StandardWebhooks { .. }
        )
    }

    /// Checks the request; the rejection says what was missing or wrong, never the secret.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), Rejection> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        match self {
            AuthConfig::None => Ok(()),
            AuthConfig::Bearer { token } => {
                let got = header("authorization")
                    .and_then(|v| {
                        v.strip_prefix("Bearer ")
                            .or_else(|| v.strip_prefix("bearer "))
                    })
                    .ok_or_else(|| {
                        unauthorized("missing `Authorization: Bearer <token>` header")
                    })?;
                if bool::from(got.as_bytes().ct_eq(token.expose().as_bytes())) {
                    Ok(())
                } else {
                    Err(unauthorized("invalid bearer token"))
                }
            }
            AuthConfig::Hmac {
                header: name,
                secret,
                prefix,
                encoding,
            } => {
                let raw = header(name)
                    .ok_or_else(|| unauthorized(format!("missing signature header `{name}`")))?;
                let sig = raw.strip_prefix(prefix.as_str()).ok_or_else(|| {
                    unauthorized(format!(
                        "signature header `{name}` must start with `{prefix}`"
                    ))
                })?;
                let got = match encoding {
                    Encoding::Hex => decode_hex(sig.trim()),
                    Encoding::Base64 => base64::engine::general_purpose::STANDARD
                        .decode(sig.trim())
                        .ok(),
                }
                .ok_or_else(|| {
                    unauthorized(format!(
                        "signature header `{name}` is not valid {encoding:?}"
                    ))
                })?;
                let want = hmac(secret.expose().as_bytes(), &[body]);
                if bool::from(got.ct_eq(&want)) {
                    Ok(())
                } else {
                    Err(unauthorized(format!(
                        "signature in `{name}` does not match the body"
                    )))
                }
            }
            AuthConfig::StandardWebhooks { secret, tolerance } => {
                let id = header("webhook-id")
                    .ok_or_else(|| unauthorized("missing `webhook-id` header"))?;
                let ts = header("webhook-timestamp")
                    .ok_or_else(|| unauthorized("missing `webhook-timestamp` header"))?;
                let sigs = header("webhook-signature")
                    .ok_or_else(|| unauthorized("missing `webhook-signature` header"))?;
                let t: i64 = ts
                    .parse()
                    .map_err(|_| unauthorized("`webhook-timestamp` is not a Unix timestamp"))?;
                let tol = tolerance
                    .map(|d| d.0)
                    .unwrap_or(std::time::Duration::from_secs(300))
                    .as_secs() as i64;
                let now = chrono::Utc::now().timestamp();
                if (now - t).abs() > tol {
                    return Err(unauthorized(format!(
                        "`webhook-timestamp` is more than {tol}s away from now"
                    )));
                }
                let want = hmac(
                    &standard_webhooks_key(secret.expose()),
                    &[id.as_bytes(), b".", ts.as_bytes(), b".", body],
                );
                let ok = sigs
                    .split(' ')
                    .filter_map(|s| s.strip_prefix("v1,"))
                    .filter_map(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                    .fold(false, |acc, got| acc | bool::from(got.ct_eq(&want)));
                if ok {
                    Ok(())
                } else {
                    Err(unauthorized(
                        "no `v1` signature in `webhook-signature` matches",
                    ))
                }
            }
        }
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Hex-encodes bytes (for signing in tests and the CLI).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// HMAC-SHA256 of `body` with `key`, hex (for clients and tests).
pub fn sign_hex(key: &[u8], body: &[u8]) -> String {
    hex(&hmac(key, &[body]))
}

/// A Standard Webhooks `v1,` signature (for clients and tests).
pub fn sign_standard(secret: &str, id: &str, ts: i64, body: &[u8]) -> String {
    let sig = hmac(
        &standard_webhooks_key(secret),
        &[id.as_bytes(), b".", ts.to_string().as_bytes(), b".", body],
    );
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(sig)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn bearer() {
        let a = AuthConfig::Bearer {
            token: Secret::new("t0k"),
        };
        assert!(a
            .verify(&headers(&[("authorization", "Bearer t0k".into())]), b"")
            .is_ok());
        assert!(a
            .verify(&headers(&[("authorization", "Bearer nope".into())]), b"")
            .is_err());
        assert!(a.verify(&HeaderMap::new(), b"").is_err());
    }

    #[test]
    fn hmac_hex_with_prefix() {
        let a = AuthConfig::Hmac {
            header: "x-sig".into(),
            secret: Secret::new("k"),
            prefix: "sha256=".into(),
            encoding: Encoding::Hex,
        };
        let sig = sign_hex(b"k", b"{\"a\":1}");
        assert!(a
            .verify(
                &headers(&[("x-sig", format!("sha256={sig}"))]),
                b"{\"a\":1}"
            )
            .is_ok());
        assert!(a
            .verify(
                &headers(&[("x-sig", format!("sha256={sig}"))]),
                b"{\"a\":2}"
            )
            .is_err());
        assert!(a.verify(&headers(&[("x-sig", sig)]), b"{\"a\":1}").is_err());
    }

    #[test]
    fn standard_webhooks_rotation_and_window() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let a = AuthConfig::StandardWebhooks {
            secret: Secret::new(secret),
            tolerance: None,
        };
        let now = chrono::Utc::now().timestamp();
        let good = sign_standard(secret, "msg_1", now, b"{}");
        let h = headers(&[
            ("webhook-id", "msg_1".into()),
            ("webhook-timestamp", now.to_string()),
            ("webhook-signature", format!("v1,AAAA {good}")),
        ]);
        assert!(a.verify(&h, b"{}").is_ok());
        let old = now - 3600;
        let h = headers(&[
            ("webhook-id", "msg_1".into()),
            ("webhook-timestamp", old.to_string()),
            (
                "webhook-signature",
                sign_standard(secret, "msg_1", old, b"{}"),
            ),
        ]);
        assert!(a
            .verify(&h, b"{}")
            .unwrap_err()
            .message
            .contains("away from now"));
    }

    #[test]
    fn standard_webhooks_spec_vector() {
        // The example from the Standard Webhooks specification.
        let sig = sign_standard(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
