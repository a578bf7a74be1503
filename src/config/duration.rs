//! Human-friendly durations (`500ms`, `10s`, `5m`, `7d`) in the configuration.

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;

/// A duration written as `500ms`, `10s`, `5m`, `2h` or `7d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        humantime::parse_duration(&raw).map(Duration).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration `{raw}` ({e}); expected e.g. `500ms`, `10s`, `5m`, `2h`, `7d`"
            ))
        })
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^([0-9]+ ?(ms|s|m|h|d) ?)+$",
            "description": "A duration such as `500ms`, `10s`, `5m`, `2h`, `7d`"
        })
    }
}

/// A size in bytes written as `1048576`, `512KiB`, `1MiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(usize),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_size(&s).map(ByteSize).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size `{s}`; expected a number of bytes or e.g. `512KiB`, `1MiB`"
                ))
            }),
        }
    }
}

fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "k" => 1024,
        "MiB" | "MB" | "M" => 1024 * 1024,
        "GiB" | "GB" | "G" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "oneOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": "^[0-9]+ ?(B|KiB|KB|k|MiB|MB|M|GiB|GB|G)?$"}],
            "description": "A size in bytes, e.g. `1048576` or `1MiB`"
        })
    }
}

/// A rate written as `10/s`, `100/min` or `500/h`: at most that many, evenly spaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// How many.
    pub count: u32,
    /// Per this period.
    pub per: std::time::Duration,
}

impl Rate {
    /// The spacing between two starts.
    pub fn interval(&self) -> std::time::Duration {
        self.per / self.count.max(1)
    }
}

fn parse_rate(s: &str) -> Option<Rate> {
    let (n, unit) = s.split_once('/')?;
    let count: u32 = n.trim().parse().ok().filter(|n| *n > 0)?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => std::time::Duration::from_secs(1),
        "m" | "min" | "minute" => std::time::Duration::from_secs(60),
        "h" | "hour" => std::time::Duration::from_secs(3600),
        other => humantime::parse_duration(other).ok()?,
    };
    // Between 1 µs and a day apart: anything else is a typo, not a rate.
    let spacing = per / count;
    (spacing >= std::time::Duration::from_micros(1)
        && spacing <= std::time::Duration::from_secs(86_400))
    .then_some(Rate { count, per })
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        parse_rate(&raw).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid rate `{raw}`; expected a positive count per period, at most a day and at least 1 µs apart, e.g. `10/s`, `100/min`, `500/h`, `3/10s`"
            ))
        })
    }
}

impl JsonSchema for Rate {
    fn schema_name() -> Cow<'static, str> {
        "Rate".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^ *[1-9][0-9]* */ *[0-9a-z ]+$",
            "description": "A rate such as `10/s`, `100/min`, `500/h` or `3/10s`"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("512KiB"), Some(512 << 10));
        assert_eq!(parse_size("10"), Some(10));
        assert_eq!(parse_size("10 parsecs"), None);
    }

    #[test]
    fn rates() {
        let r = parse_rate("10/s").unwrap();
        assert_eq!(r.interval(), std::time::Duration::from_millis(100));
        assert_eq!(parse_rate("3/10s").unwrap().interval().as_millis(), 3333);
        assert_eq!(
            parse_rate("120/min").unwrap().interval(),
            std::time::Duration::from_millis(500)
        );
        assert!(parse_rate("0/s").is_none());
        assert!(parse_rate("10").is_none());
        assert!(parse_rate("10/fortnight").is_none());
        assert!(parse_rate("1/0s").is_none());
        assert!(
            parse_rate("1/300000000000y").is_none(),
            "more than a day apart"
        );
        assert!(parse_rate("4000000000/s").is_none(), "not a u32");
        assert!(parse_rate("2000000/s").is_none(), "under 1 µs apart");
    }
}
