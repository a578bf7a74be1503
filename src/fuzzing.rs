//! What the fuzz targets run (`fuzz/`), shared with the test that replays the seed corpus
//! and every input a fuzzer ever crashed (`tests/it/fuzz_regressions.rs`), so that a fixed
//! crash stays fixed in CI without a nightly toolchain.

use crate::sources::{webhook::Webhook, Source};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use std::sync::LazyLock;

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
});

/// The config loader: any text is a config or a precise error, never a panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = crate::config::parse("fuzz.yaml", text) {
        let _ = crate::compile("fuzz.yaml".into(), config);
    }
}

/// Splits an input into headers (`name: value` lines) and, after an empty line, a body.
fn request(data: &[u8]) -> (HeaderMap, Vec<u8>) {
    let split = data
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or(data.len());
    let mut headers = HeaderMap::new();
    for line in data[..split].split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let body = data.get(split + 2..).unwrap_or_default().to_vec();
    (headers, body)
}

/// The CloudEvents parsers (binary, structured, batch), then the views that routing and
/// storing take of what they accept.
pub fn cloudevents(data: &[u8]) {
    let (headers, body) = request(data);
    RT.block_on(async {
        if let Ok(events) = crate::sources::cloudevents::parse_request(
            &headers,
            axum::body::Body::from(body),
            1 << 20,
            100,
            &crate::sources::auth::AuthConfig::None,
        )
        .await
        {
            for e in &events {
                let _ = crate::event::view(e);
                let _ = crate::event::to_json(e);
            }
        }
    });
}

const WEBHOOK: &str = r#"
sources:
  - name: hook
    type: webhook
    path: /hook
    schema: {type: object, properties: {count: {type: integer}}}
    mapping:
      type: "alert.{{ body.alert | default('none') }}"
      subject: "{{ body.vm }}"
      id: "{{ body.id }}-{{ body.items | length if body.items is defined else 0 }}"
      data: '{"vm": {{ body.vm | tojson }}, "n": {{ body.count | default(0) }}}'
"#;

static HOOK: LazyLock<Webhook> = LazyLock::new(|| {
    let config = crate::config::parse("fuzz.yaml", WEBHOOK).expect("the fixture parses");
    let mut diags = crate::config::Diagnostics::default();
    crate::sources::build(&config, &mut diags)
        .into_iter()
        .find_map(|s| match s {
            Source::Webhook(w) => Some(w),
            _ => None,
        })
        .expect("the fixture has a webhook source")
});

/// The webhook mapping: a JSON body through a schema and the type, subject, id and data
/// templates of a fixed source.
pub fn webhook(data: &[u8]) {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let body = axum::body::Body::from(data.to_vec());
    RT.block_on(async {
        if let Ok(e) = HOOK.to_event(&headers, body).await {
            let _ = crate::event::to_json(&e);
        }
    });
}

/// The SOAP/XML reader and the vCenter event conversion over whatever a vCenter (or
/// something pretending to be one) answers.
pub fn soap(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(node) = vsphere::Node::parse(text) else {
        return;
    };
    let _ = vsphere::events::to_json(&node);
    let mut stack = vec![&node];
    while let Some(n) = stack.pop() {
        let _ = vsphere::events::key(n);
        let _ = vsphere::events::class(n);
        let _ = vsphere::events::event_data(n);
        stack.extend(n.children.iter());
    }
}

const SYSLOG: &str = r#"
sources:
  - name: logs
    type: syslog
    tcp: 127.0.0.1:0
    max_frame: 2KiB
    rules:
      - match: 'user (?P<user>\S+) from (?P<ip>[0-9.]+)'
        app: sshd
        event_type: "security.{{ syslog.severity | default('none') }}"
        subject: "{{ captures.user }}@{{ syslog.host }}"
        data: '{"ip": {{ captures.ip | tojson }}, "sd": {{ syslog.structured_data | tojson }}}'
      - match: '(?i)compromised'
        event_type: security.compromised
"#;

static SYSLOG_SOURCE: LazyLock<Box<crate::sources::syslog::Syslog>> = LazyLock::new(|| {
    let config = crate::config::parse("fuzz.yaml", SYSLOG).expect("the fixture parses");
    let mut diags = crate::config::Diagnostics::default();
    crate::sources::build(&config, &mut diags)
        .into_iter()
        .find_map(|s| match s {
            Source::Syslog(s) => Some(s),
            _ => None,
        })
        .expect("the fixture has a syslog source")
});

/// The syslog source's TCP framing (octet counting and lines, oversized frames skipped), the
/// RFC 3164/5424 parser and the rules' mapping, over a stream cut into chunks of a size the
/// first byte chooses.
pub fn syslog(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    SYSLOG_SOURCE.frame_and_map(rest, usize::from(first % 64) + 1);
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_syslog_target_reaches_the_rules() {
        let stream = b"62 <13>Nov 30 10:00:00 web02 sshd[12]: user bob from 192.168.1.9\n15 <13>compromised<13>1 2026-11-30T10:00:00Z h app - - - compromised\n";
        for chunk in [1, 7, 64] {
            assert_eq!(
                super::SYSLOG_SOURCE.frame_and_map(stream, chunk),
                3,
                "chunks of {chunk}"
            );
        }
    }
}
