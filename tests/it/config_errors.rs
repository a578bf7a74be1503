//! Configuration errors name file:line:column and what was expected (snapshots).

fn check(yaml: &str) -> String {
    std::env::remove_var("REFLEX_IT_UNSET");
    match reflex::config::parse("reflex.yaml", yaml)
        .map_err(|e| e.to_string())
        .and_then(|c| {
            reflex::compile("reflex.yaml".into(), c)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }) {
        Ok(()) => "ok".into(),
        Err(e) => e,
    }
}

#[test]
fn unknown_key() {
    insta::assert_snapshot!(check("http:\n  listen: 127.0.0.1:8080\n  lisen: 1\n"));
}

#[test]
fn unknown_source_type() {
    insta::assert_snapshot!(check(
        "sources:\n  - name: a\n    type: webhok\n    path: /a\n"
    ));
}

#[test]
fn bad_duration() {
    insta::assert_snapshot!(check(
        "triggers:\n  - name: t\n    action: {type: emit, event_type: x}\n    delivery:\n      timeout: 5 parsecs\n"
    ));
}

#[test]
fn missing_env_secret() {
    insta::assert_snapshot!(check(
        "sources:\n  - name: a\n    type: webhook\n    path: /a\n    auth:\n      type: bearer\n      token: ${env:REFLEX_IT_UNSET}\n"
    ));
}

#[test]
fn vcenter_in_clear_text_or_with_two_trust_settings() {
    insta::assert_snapshot!(check(
        r#"vcenters:
  plain: {url: "http://vc.example.com/sdk", username: u, password: p}
  lab: {url: "http://vc.lab/sdk", username: u, password: p, insecure: true}
  both: {url: "https://vc.example.com/sdk", username: u, password: p, ca_file: /etc/ssl/certs/ca-certificates.crt, thumbprint: "AA:BB"}
"#
    ));
}

#[test]
fn wrong_value_type() {
    insta::assert_snapshot!(check("http:\n  queue: lots\n"));
}

#[test]
fn every_semantic_error_at_once() {
    insta::assert_snapshot!(check(
        r#"api:
  listen: 0.0.0.0:9999
sources:
  - {name: a, type: webhook, path: /a}
  - {name: a, type: webhook, path: /a, mapping: {type: "{{ body.x "}}
  - {name: "b c", type: cloudevents, path: nope}
triggers:
  - name: t
    when: "event.data.x >"
    action: {type: http, url: "ftp://x"}
  - name: t
    filters: [{exact: {}}]
    action: {type: emit, event_type: x}
    delivery:
      ordering_key: "{{ event.subject"
      max_attempts: 0
"#
    ));
}

#[test]
fn examples_check_clean() {
    // The examples read credentials from the environment, as an operator's would.
    for var in [
        "VCENTER_USER",
        "VCENTER_PASSWORD",
        "LOGINSIGHT_TOKEN",
        "ALERTMANAGER_TOKEN",
        "SLACK_SIGNING_SECRET",
        "CHAT_WEBHOOK_PATH",
        "VROPS_PASSWORD",
    ] {
        std::env::set_var(var, "example");
    }
    std::env::set_var(
        "SLACK_APPROVALS_WEBHOOK",
        "https://hooks.slack.com/services/example",
    );
    std::env::set_var(
        "AMQP_URL",
        "amqp://example:example@rabbitmq.example.com:5672/%2f",
    );
    std::env::set_var("REFLEX_ADMIN_TOKEN", "example-admin-token");
    std::env::set_var(
        "REFLEX_PG_URL",
        "postgres://reflex:example@db.example.com/reflex",
    );
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            if let Err(e) = reflex::compile_file(&path) {
                panic!("{e}");
            }
        }
    }
}

#[test]
fn json_schema_describes_the_config() {
    let schema = reflex::config::json_schema();
    let text = schema.to_string();
    for word in [
        "sources",
        "triggers",
        "webhook",
        "cloudevents",
        "http_request",
        "exec",
        "emit",
        "ordering_key",
        "once_within",
    ] {
        assert!(text.contains(word), "schema lacks `{word}`");
    }
    // The published schema validates the quickstart.
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/quickstart.yaml"
    ))
    .unwrap();
    let value: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn the_committed_schema_file_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/reflex.schema.json");
    let want = serde_json::to_string_pretty(&reflex::config::json_schema()).unwrap() + "\n";
    let have = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        have == want,
        "reflex.schema.json is stale: run `cargo run -q -- schema > reflex.schema.json`"
    );
}

#[test]
fn the_committed_reference_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reference.md");
    let have = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        have == reflex::config::reference::markdown(),
        "docs/reference.md is stale: run `cargo run -q -- docs > docs/reference.md`"
    );
}

#[test]
fn bad_schedule() {
    insta::assert_snapshot!(check(
        "sources:\n  - name: a\n    type: schedule\n    cron: \"61 * * * *\"\n  - name: b\n    type: schedule\n    cron: \"0 2 * * *\"\n    timezone: Europe/Berln\n  - name: c\n    type: schedule\n    cron: \"0 0 30 2 *\"\n"
    ));
}

#[test]
fn bad_syslog() {
    insta::assert_snapshot!(check(
        "sources:\n  - name: s\n    type: syslog\n    udp: 127.0.0.1:99999\n    tls: {cert_file: /nonexistent/c.pem, key_file: /nonexistent/k.pem}\n    rules:\n      - {match: '(unclosed', event_type: t}\n  - name: t\n    type: syslog\n    tcp: 127.0.0.1:5514\n    tls: {cert_file: /nonexistent/c.pem, key_file: /nonexistent/k.pem}\n    rules: []\n"
    ));
}

#[test]
fn bad_amqp() {
    insta::assert_snapshot!(check(
        "sources:\n  - name: a\n    type: amqp\n    url: http://127.0.0.1:5672/\n    queue: ''\n    prefetch: 0\n  - name: b\n    type: amqp\n    url: amqps://h/\n    ca_file: /nonexistent/ca.pem\n    queue: q\ntriggers:\n  - name: t\n    filters: [{exact: {type: x}}]\n    action: {type: amqp, url: 'rabbitmq:5672', exchange: x}\n  - name: u\n    filters: [{exact: {type: x}}]\n    action: {type: amqp, url: 'amqp://h/', ca_file: /etc/hostname}\n"
    ));
}

#[test]
fn bad_workflow() {
    insta::assert_snapshot!(check(
        "triggers:\n  - name: w\n    action:\n      type: workflow\n      steps:\n        - {name: a, action: {type: http, url: 'http://127.0.0.1:9/'}}\n        - {name: a, action: {type: http, url: 'http://127.0.0.1:9/'}}\n        - {name: 'b-c', when: 'event.type ==', max_attempts: 0, action: {type: workflow, steps: []}}\n  - name: empty\n    action: {type: workflow, steps: []}\n"
    ));
}
