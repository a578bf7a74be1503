//! Request authentication for HTTP sources: none, bearer token, HMAC-SHA256 of the body (or
//! of a timestamp and the body) in a named header, or Standard Webhooks. Every comparison is
//! constant-time. A signed request with a timestamp is accepted once: [`Replays`] remembers
//! it until its timestamp is out of tolerance.

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
    /// `Authorization: Basic <base64 of user:password>` (Alertmanager's `basic_auth`).
    Basic {
        /// The expected user name.
        username: String,
        /// The expected password.
        password: Secret,
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
        /// Sign a timestamp with the body, refuse stale timestamps and refuse a request
        /// that was already accepted (a captured request cannot be sent again).
        timestamp: Option<HmacTimestamp>,
    },
    /// Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
    StandardWebhooks {
        /// `whsec_…` (base64 key) or a raw key.
        secret: Secret,
        /// Largest accepted clock difference; 5 minutes by default.
        tolerance: Option<Duration>,
    },
}

/// The timestamp part of an HMAC scheme, e.g. Slack's: `{header:
/// X-Slack-Request-Timestamp, signed: "v0:{timestamp}:{body}"}` with `prefix: "v0="`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HmacTimestamp {
    /// Header carrying the Unix time (seconds) of the request.
    pub header: String,
    /// What is signed: fixed text with one `{timestamp}` and one `{body}`;
    /// `{timestamp}.{body}` by default.
    #[serde(default = "default_signed")]
    pub signed: String,
    /// Largest accepted clock difference; 5 minutes by default.
    pub tolerance: Option<Duration>,
}

fn default_signed() -> String {
    "{timestamp}.{body}".into()
}

impl HmacTimestamp {
    fn tolerance_secs(&self) -> i64 {
        self.tolerance
            .map(|d| d.0)
            .unwrap_or(std::time::Duration::from_secs(300))
            .as_secs() as i64
    }

    /// The signed text around `{timestamp}` and `{body}`, in order, with which comes first.
    fn parts(&self) -> Option<(&str, &str, &str, bool)> {
        let (t, b) = (
            self.signed.find("{timestamp}")?,
            self.signed.find("{body}")?,
        );
        if self.signed.matches("{timestamp}").count() != 1
            || self.signed.matches("{body}").count() != 1
        {
            return None;
        }
        let (first, first_len, second, second_len) = if t < b {
            (t, "{timestamp}".len(), b, "{body}".len())
        } else {
            (b, "{body}".len(), t, "{timestamp}".len())
        };
        Some((
            &self.signed[..first],
            &self.signed[first + first_len..second],
            &self.signed[second + second_len..],
            t < b,
        ))
    }
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
            AuthConfig::Bearer { .. } | AuthConfig::Basic { .. } => self.verify(headers, b""),
            AuthConfig::Hmac {
                header, timestamp, ..
            } => {
                present(header)?;
                match timestamp {
                    Some(ts) => fresh(headers, ts).map(|_| ()),
                    None => Ok(()),
                }
            }
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

    /// What is wrong with the scheme's settings, for the source's diagnostics.
    pub fn check(&self) -> Result<(), String> {
        match self {
            AuthConfig::Hmac {
                timestamp: Some(ts),
                ..
            } if ts.parts().is_none() => Err(format!(
                "auth.timestamp.signed must hold `{{timestamp}}` and `{{body}}` once each, e.g. `{{timestamp}}.{{body}}`; got `{}`",
                ts.signed
            )),
            _ => Ok(()),
        }
    }

    /// For a scheme that signs a timestamp: what identifies this request for replay
    /// refusal (its signature header), and until when (Unix seconds) it must be remembered.
    pub fn replay_key(&self, headers: &HeaderMap) -> Option<(String, i64)> {
        let AuthConfig::Hmac {
            header,
            timestamp: Some(ts),
            ..
        } = self
        else {
            return None;
        };
        let t: i64 = headers
            .get(&ts.header)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let sig = headers.get(header)?.to_str().ok()?;
        Some((sig.to_string(), t + ts.tolerance_secs()))
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
            AuthConfig::Basic { username, password } => {
                use base64::Engine;
                let encoded = header("authorization")
                    .and_then(|v| v.split_once(' '))
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
                    .map(|(_, rest)| rest.trim())
                    .ok_or_else(|| {
                        unauthorized("missing `Authorization: Basic <credentials>` header")
                    })?;
                let got = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|_| unauthorized("the basic credentials are not valid base64"))?;
                let want = format!("{username}:{}", password.expose());
                if bool::from(got.as_slice().ct_eq(want.as_bytes())) {
                    Ok(())
                } else {
                    Err(unauthorized("invalid user name or password"))
                }
            }
            AuthConfig::Hmac {
                header: name,
                secret,
                prefix,
                encoding,
                timestamp,
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
                let key = secret.expose().as_bytes();
                let want = match timestamp {
                    None => hmac(key, &[body]),
                    Some(ts) => timestamped_mac(key, ts, fresh(headers, ts)?, body),
                };
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

/// HMAC-SHA256 of `ts.signed` with the timestamp `t` and the body in their places.
fn timestamped_mac(key: &[u8], ts: &HmacTimestamp, t: &str, body: &[u8]) -> Vec<u8> {
    let (before, between, after, t_first) = ts.parts().expect("checked when the source was built");
    let (x, y): (&[u8], &[u8]) = if t_first {
        (t.as_bytes(), body)
    } else {
        (body, t.as_bytes())
    };
    hmac(
        key,
        &[
            before.as_bytes(),
            x,
            between.as_bytes(),
            y,
            after.as_bytes(),
        ],
    )
}

/// A timestamped HMAC signature, hex (for clients and tests); `signed` as in
/// [`HmacTimestamp::signed`].
pub fn sign_timestamped(key: &[u8], signed: &str, t: i64, body: &[u8]) -> String {
    let ts = HmacTimestamp {
        header: String::new(),
        signed: signed.into(),
        tolerance: None,
    };
    hex(&timestamped_mac(key, &ts, &t.to_string(), body))
}

/// The request's timestamp header, checked to be within tolerance of now.
fn fresh<'h>(headers: &'h HeaderMap, ts: &HmacTimestamp) -> Result<&'h str, Rejection> {
    let name = &ts.header;
    let raw = headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unauthorized(format!("missing timestamp header `{name}`")))?
        .trim();
    let t: i64 = raw
        .parse()
        .map_err(|_| unauthorized(format!("`{name}` is not a Unix timestamp")))?;
    let tol = ts.tolerance_secs();
    if (chrono::Utc::now().timestamp() - t).abs() > tol {
        return Err(unauthorized(format!(
            "`{name}` is more than {tol}s away from now"
        )));
    }
    Ok(raw)
}

/// Most signed requests remembered per source for replay refusal; past it the oldest are
/// forgotten early (with a warning).
const MAX_REMEMBERED: usize = 100_000;

/// Signed requests a source accepted, each remembered until its timestamp is out of
/// tolerance (after that the timestamp check refuses it anyway).
#[derive(Default)]
pub struct Replays {
    memory: std::sync::Mutex<ReplayMemory>,
}

#[derive(Default)]
struct ReplayMemory {
    keys: std::collections::HashSet<String>,
    order: std::collections::VecDeque<(i64, String)>,
    warned: bool,
}

impl Replays {
    /// Refuses (409 `replayed`) a signed request this source already accepted.
    pub fn refuse(&self, auth: &AuthConfig, headers: &HeaderMap) -> Result<(), Rejection> {
        let Some((key, _)) = auth.replay_key(headers) else {
            return Ok(());
        };
        let mut m = self.memory.lock().expect("replay memory");
        m.forget_expired(chrono::Utc::now().timestamp());
        if m.keys.contains(&key) {
            return Err(Rejection::new(
                StatusCode::CONFLICT,
                "replayed",
                "this signed request was already accepted; a new request needs a new timestamp and signature",
            ));
        }
        Ok(())
    }

    /// Remembers a signed request once it was accepted (not before: a request refused
    /// for another reason may be retried as it is).
    pub fn accepted(&self, auth: &AuthConfig, headers: &HeaderMap) {
        let Some((key, until)) = auth.replay_key(headers) else {
            return;
        };
        let mut m = self.memory.lock().expect("replay memory");
        if m.order.len() >= MAX_REMEMBERED {
            if !m.warned {
                m.warned = true;
                tracing::warn!(
                    "more than {MAX_REMEMBERED} signed requests within the timestamp tolerance: the oldest are forgotten early, so a replay of one of them would be accepted; shorten auth.timestamp.tolerance"
                );
            }
            if let Some((_, old)) = m.order.pop_front() {
                m.keys.remove(&old);
            }
        }
        if m.keys.insert(key.clone()) {
            m.order.push_back((until, key));
        }
    }
}

impl ReplayMemory {
    fn forget_expired(&mut self, now: i64) {
        while self.order.front().is_some_and(|(until, _)| *until < now) {
            let (_, key) = self.order.pop_front().expect("front exists");
            self.keys.remove(&key);
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
    fn basic() {
        use base64::Engine;
        let a = AuthConfig::Basic {
            username: "am".into(),
            password: Secret::new("pa:ss"),
        };
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let with = |v: String| headers(&[("authorization", v)]);
        assert!(a
            .verify_headers(&with(format!("Basic {}", b64("am:pa:ss"))))
            .is_ok());
        assert!(a
            .verify_headers(&with(format!("basic {}", b64("am:pa:ss"))))
            .is_ok());
        assert!(a
            .verify_headers(&with(format!("Basic {}", b64("am:pa:sx"))))
            .is_err());
        assert!(a
            .verify_headers(&with(format!("Basic {}", b64("xm:pa:ss"))))
            .is_err());
        assert!(a.verify_headers(&with("Basic !!!".into())).is_err());
        assert!(a.verify_headers(&with("Bearer pa:ss".into())).is_err());
        assert!(a.verify_headers(&HeaderMap::new()).is_err());
    }

    #[test]
    fn hmac_hex_with_prefix() {
        let a = AuthConfig::Hmac {
            header: "x-sig".into(),
            secret: Secret::new("k"),
            prefix: "sha256=".into(),
            encoding: Encoding::Hex,
            timestamp: None,
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
    fn hmac_with_a_timestamp_slack_style() {
        // Computed independently: Python's hmac.new(key, b"v0:1531420618:token=abc&text=hi",
        // sha256).hexdigest().
        assert_eq!(
            sign_timestamped(
                b"8f742231b10e8888abcd99yyyzzz85a5",
                "v0:{timestamp}:{body}",
                1531420618,
                b"token=abc&text=hi"
            ),
            "2f91acd988f5856896084cb880b2cec71e40f294561294161ef4318d521be91d"
        );
        let a = AuthConfig::Hmac {
            header: "x-slack-signature".into(),
            secret: Secret::new("k"),
            prefix: "v0=".into(),
            encoding: Encoding::Hex,
            timestamp: Some(HmacTimestamp {
                header: "x-slack-request-timestamp".into(),
                signed: "v0:{timestamp}:{body}".into(),
                tolerance: None,
            }),
        };
        assert!(a.check().is_ok());
        let now = chrono::Utc::now().timestamp();
        let signed = |t: i64, body: &[u8]| {
            headers(&[
                ("x-slack-request-timestamp", t.to_string()),
                (
                    "x-slack-signature",
                    format!(
                        "v0={}",
                        sign_timestamped(b"k", "v0:{timestamp}:{body}", t, body)
                    ),
                ),
            ])
        };
        assert!(a.verify(&signed(now, b"x"), b"x").is_ok());
        // The body signed with another timestamp than the one sent.
        let mut moved = signed(now, b"x");
        moved.insert(
            "x-slack-request-timestamp",
            (now - 1).to_string().parse().unwrap(),
        );
        assert!(a.verify(&moved, b"x").is_err());
        // Stale, even when correctly signed; refused on the headers alone.
        let stale = signed(now - 600, b"x");
        assert!(a
            .verify_headers(&stale)
            .unwrap_err()
            .message
            .contains("away from now"));
        assert!(a.verify(&stale, b"x").is_err());
        // Remembered once accepted, refused after that.
        let replays = Replays::default();
        let h = signed(now, b"x");
        assert!(replays.refuse(&a, &h).is_ok());
        replays.accepted(&a, &h);
        assert_eq!(replays.refuse(&a, &h).unwrap_err().reason, "replayed");
        assert!(replays.refuse(&a, &signed(now, b"y")).is_ok());
    }

    #[test]
    fn a_signed_text_needs_both_placeholders() {
        let a = |signed: &str| AuthConfig::Hmac {
            header: "x".into(),
            secret: Secret::new("k"),
            prefix: String::new(),
            encoding: Encoding::Hex,
            timestamp: Some(HmacTimestamp {
                header: "t".into(),
                signed: signed.into(),
                tolerance: None,
            }),
        };
        assert!(a("{body}|{timestamp}").check().is_ok());
        assert!(a("{body}").check().unwrap_err().contains("{timestamp}"));
        assert!(a("{timestamp}{body}{body}").check().is_err());
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
