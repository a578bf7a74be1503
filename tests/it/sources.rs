//! Sources beyond webhooks and CloudEvents, with their own senders' payloads: Alertmanager
//! (recorded notifications, and the real Alertmanager when it is installed).

use crate::common::{Receiver, Reflex};
use std::collections::BTreeSet;
use std::time::Duration;

const TOKEN: &str = "s3cret-token";

fn alertmanager_config(receiver: &Receiver) -> String {
    format!(
        r#"
store: {{path: $DIR/reflex.db}}
sources:
  - name: am
    type: alertmanager
    path: /alertmanager
    auth: {{type: bearer, token: {TOKEN}}}
triggers:
  - name: alerts
    filters: [{{prefix: {{type: com.reflex.alertmanager.}}}}]
    action: {{type: http, url: "{}"}}
"#,
        receiver.url()
    )
}

async fn post_notification(r: &Reflex, body: &str, token: &str) -> reqwest::Response {
    r.client
        .post(format!("{}/alertmanager", r.http))
        .header("content-type", "application/json")
        .header("user-agent", "Alertmanager/0.25.0")
        .header("authorization", format!("Bearer {token}"))
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// The (type, subject) of each delivery, waiting for `n` of them and then for quiet.
async fn deliveries(rx: &mut Receiver, n: usize) -> Vec<(String, String, String)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let d = rx.next(10).await;
        let h = |k: &str| d.headers[k].to_str().unwrap().to_string();
        got.push((h("ce-type"), h("ce-subject"), d.id()));
    }
    rx.nothing_for(500).await;
    got
}

#[tokio::test]
async fn alertmanager_recorded_notifications_are_one_event_per_alert_and_repeats_deduplicate() {
    let mut rx = Receiver::start().await;
    let r = Reflex::start(&alertmanager_config(&rx)).await;
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/fixtures/alertmanager"
    );
    let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).unwrap();

    // A sender without the token stores nothing.
    let resp = post_notification(&r, &read("1-firing.json"), "wrong").await;
    assert_eq!(resp.status(), 401);

    let mut all = Vec::new();
    for (file, new) in [
        ("1-firing.json", 2),
        ("2-repeat.json", 0),
        ("3-one-resolved.json", 1),
        ("4-repeat.json", 0),
        ("5-resolved.json", 1),
    ] {
        let resp = post_notification(&r, &read(file), TOKEN).await;
        assert_eq!(resp.status(), 202, "{file}");
        let answer: serde_json::Value = resp.json().await.unwrap();
        let alerts = answer["ids"].as_array().unwrap().len();
        let duplicates = answer["duplicates"].as_array().unwrap().len();
        assert_eq!(alerts - duplicates, new, "{file}: {answer}");
        all.extend(deliveries(&mut rx, new).await);
    }
    let states: BTreeSet<(String, String)> =
        all.iter().map(|(t, s, _)| (t.clone(), s.clone())).collect();
    let want: BTreeSet<(String, String)> = [
        ("com.reflex.alertmanager.firing", "esx-01.example.com"),
        ("com.reflex.alertmanager.firing", "esx-02.example.com"),
        ("com.reflex.alertmanager.resolved", "esx-01.example.com"),
        ("com.reflex.alertmanager.resolved", "esx-02.example.com"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(states, want);
    // The id is the fingerprint Alertmanager gave the alert, its start and its status.
    assert!(all
        .iter()
        .any(|(_, _, id)| id.starts_with("89d30c077742c3ca:") && id.ends_with(":resolved")));

    // Not a notification: a precise 400, and reflex keeps serving.
    let resp = post_notification(
        &r,
        r#"{"version":"4","alerts":[{"status":"firing"}]}"#,
        TOKEN,
    )
    .await;
    assert_eq!(resp.status(), 400);
    let body = resp.text().await.unwrap();
    assert!(body.contains("startsAt"), "{body}");
    r.stop().await;
}

/// The real Alertmanager (Debian's `prometheus-alertmanager`, which the test script
/// installs) sends to reflex: firing, repeats, resolved.
#[tokio::test]
async fn alertmanager_itself_notifies_reflex() {
    let bin = ["/usr/bin/prometheus-alertmanager", "/usr/bin/alertmanager"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(bin) = bin else {
        eprintln!("SKIPPED: Alertmanager is not installed (Debian: apt-get install prometheus-alertmanager)");
        return;
    };
    let mut rx = Receiver::start().await;
    let r = Reflex::start(&alertmanager_config(&rx)).await;
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = dir.path().join("am.yml");
    std::fs::write(
        &cfg,
        format!(
            "route: {{receiver: reflex, group_by: [alertname], group_wait: 200ms, group_interval: 1s, repeat_interval: 2s}}\n\
             receivers:\n  - name: reflex\n    webhook_configs:\n      - url: {}/alertmanager\n        send_resolved: true\n        http_config: {{authorization: {{credentials: {TOKEN}}}}}\n",
            r.http
        ),
    )
    .unwrap();
    let am = std::process::Command::new(bin)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _am = Kill(am);
    let api = format!("http://127.0.0.1:{port}/api/v2/alerts");
    let alert = |instance: &str, ends: Option<String>| {
        let mut a = serde_json::json!({"labels": {"alertname": "DatastoreFull", "instance": instance, "severity": "critical"},
            "annotations": {"summary": format!("datastore of {instance} is full")}});
        if let Some(e) = ends {
            a["endsAt"] = e.into();
        }
        a
    };
    let post = |body: serde_json::Value| {
        let client = r.client.clone();
        let api = api.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                match client.post(&api).json(&body).send().await {
                    Ok(resp) if resp.status().is_success() => return,
                    _ if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    other => panic!("Alertmanager's API did not take the alerts: {other:?}"),
                }
            }
        }
    };
    post(serde_json::json!([
        alert("esx-01", None),
        alert("esx-02", None)
    ]))
    .await;
    let mut firing = BTreeSet::new();
    for _ in 0..2 {
        let d = rx.next(15).await;
        assert_eq!(d.headers["ce-type"], "com.reflex.alertmanager.firing");
        firing.insert(d.headers["ce-subject"].to_str().unwrap().to_string());
    }
    assert_eq!(
        firing,
        BTreeSet::from(["esx-01".to_string(), "esx-02".to_string()])
    );
    // Repeats (every 2 s here) are duplicates: nothing new is delivered.
    rx.nothing_for(4500).await;
    let past = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    post(serde_json::json!([alert("esx-01", Some(past))])).await;
    let d = rx.next(15).await;
    assert_eq!(d.headers["ce-type"], "com.reflex.alertmanager.resolved");
    assert_eq!(d.headers["ce-subject"], "esx-01");
    rx.nothing_for(3000).await;
    r.stop().await;
}

/// A schedule through the whole pipeline, and its catch-up after a restart: every second,
/// each firing's id names its time; stopped for a few seconds, the next start fires once
/// for the last time missed.
#[tokio::test]
async fn a_schedule_fires_through_the_pipeline_and_catches_up_after_a_restart() {
    let mut rx = Receiver::start().await;
    let yaml = format!(
        r#"
store: {{path: $DIR/reflex.db}}
sources:
  - name: tick
    type: schedule
    cron: "* * * * * *"
    timezone: Europe/Berlin
    event_type: com.example.tick
    catch_up: 1h
triggers:
  - name: ticks
    filters: [{{exact: {{type: com.example.tick}}}}]
    action: {{type: http, url: "{}"}}
"#,
        rx.url()
    );
    let r = Reflex::start(&yaml).await;
    let first = rx.next(5).await;
    let second = rx.next(5).await;
    let at = |d: &crate::common::Received| {
        let id = d.id();
        let t = id
            .strip_prefix("tick@")
            .expect("id is source@time")
            .to_string();
        chrono::DateTime::parse_from_rfc3339(&t)
            .unwrap()
            .timestamp()
    };
    assert_eq!(at(&second) - at(&first), 1);
    assert_eq!(first.headers["ce-subject"], "tick");
    let dir = r.stop().await;
    let mut last_before = at(&second);
    while let Ok(d) = rx.rx.try_recv() {
        last_before = last_before.max(at(&d));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = Reflex::start_in(&yaml, dir).await;
    // A firing stored just before the stop may still be delivered first; then one catch-up
    // for the last second missed, then the regular firings.
    let mut after = Vec::new();
    for _ in 0..4 {
        let d = rx.next(5).await;
        let body: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
        after.push((at(&d), body["catch_up"] == true));
    }
    let caught_up: Vec<_> = after.iter().filter(|a| a.1).collect();
    assert_eq!(caught_up.len(), 1, "{after:?}");
    assert!(
        caught_up[0].0 >= last_before + 2,
        "{after:?} after {last_before}"
    );
    r.stop().await;
}

fn syslog_config(receiver: &Receiver, udp: u16, tcp: u16) -> String {
    format!(
        r#"
store: {{path: $DIR/reflex.db}}
sources:
  - name: logs
    type: syslog
    udp: 127.0.0.1:{udp}
    tcp: 127.0.0.1:{tcp}
    max_frame: 1KiB
    idle_timeout: 500ms
    rules:
      - match: 'VM (?P<vm>\S+) is compromised'
        app: sshd
        event_type: security.compromised
        subject: "{{{{ captures.vm }}}}"
triggers:
  - name: all
    action: {{type: http, url: "{}"}}
"#,
        receiver.url()
    )
}

fn logger(args: &[&str]) {
    let out = std::process::Command::new("logger")
        .args(args)
        .output()
        .expect("logger (util-linux) runs");
    assert!(out.status.success(), "logger {args:?}: {out:?}");
}

async fn rejected(r: &Reflex, reason: &str) -> u64 {
    let m = r.metrics().await;
    let want = format!("reflex_events_rejected_total{{source=\"logs\",reason=\"{reason}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// util-linux's `logger` sends RFC 5424 over UDP, RFC 3164 over TCP with newlines, and RFC
/// 5424 over TCP with octet counting: each matching line is one event with the syslog
/// fields, and a line no rule matches is counted, not stored.
#[tokio::test]
async fn syslog_from_logger_over_udp_and_tcp() {
    let (udp, tcp) = (
        crate::e2e_binary::free_port(),
        crate::e2e_binary::free_port(),
    );
    let mut rx = Receiver::start().await;
    let r = Reflex::start(&syslog_config(&rx, udp, tcp)).await;
    let (u, t) = (udp.to_string(), tcp.to_string());
    let base = ["--server", "127.0.0.1", "--tag", "sshd"];
    logger(
        &[
            &base[..],
            &[
                "--port",
                &u,
                "--udp",
                "--rfc5424",
                "--sd-id",
                "origin@32473",
                "--sd-param",
                "ip=\"10.0.0.5\"",
                "VM web-01 is compromised",
            ],
        ]
        .concat(),
    );
    logger(
        &[
            &base[..],
            &[
                "--port",
                &t,
                "--tcp",
                "--rfc3164",
                "VM web-02 is compromised",
            ],
        ]
        .concat(),
    );
    logger(
        &[
            &base[..],
            &[
                "--port",
                &t,
                "--tcp",
                "--octet-count",
                "--rfc5424",
                "VM web-03 is compromised",
            ],
        ]
        .concat(),
    );
    logger(&[&base[..], &["--port", &t, "--tcp", "nothing to see here"]].concat());
    logger(&[
        "--server",
        "127.0.0.1",
        "--port",
        &t,
        "--tcp",
        "--tag",
        "cron",
        "VM web-04 is compromised",
    ]);
    let mut got = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let d = rx.next(10).await;
        assert_eq!(d.headers["ce-type"], "security.compromised");
        let body: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
        got.insert(d.headers["ce-subject"].to_str().unwrap().to_string(), body);
    }
    rx.nothing_for(500).await;
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["web-01", "web-02", "web-03"]
    );
    for body in got.values() {
        assert_eq!(body["syslog"]["app"], "sshd", "{body}");
        assert!(body["syslog"]["host"].is_string(), "{body}");
        assert_eq!(body["syslog"]["severity"], "notice", "{body}");
    }
    assert_eq!(
        got["web-01"]["syslog"]["structured_data"]["origin@32473"]["ip"],
        "10.0.0.5"
    );
    assert_eq!(got["web-02"]["captures"]["vm"], "web-02");
    // The other app's line and the line about nothing: counted, not stored.
    assert_eq!(rejected(&r, "unmatched").await, 2);
    r.stop().await;
}

/// Bad input over TCP is counted and skipped without disturbing the connection or other
/// clients: invalid UTF-8, an oversized line, and a client that stalls mid-frame.
#[tokio::test]
async fn syslog_tcp_survives_bad_frames_and_stalled_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (udp, tcp) = (
        crate::e2e_binary::free_port(),
        crate::e2e_binary::free_port(),
    );
    let mut rx = Receiver::start().await;
    let r = Reflex::start(&syslog_config(&rx, udp, tcp)).await;
    let addr = format!("127.0.0.1:{tcp}");
    // A client that stops in the middle of a line.
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(b"<13>Nov 30 10:00:00 h sshd: VM stalled-1 is comp")
        .await
        .unwrap();
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut bad = b"<13>Nov 30 10:00:00 h sshd: VM \xff\xfe is compromised\n".to_vec();
    bad.extend(vec![b'x'; 2000]);
    bad.extend(b"\n<13>Nov 30 10:00:00 h sshd: VM good-1 is compromised\n");
    c.write_all(&bad).await.unwrap();
    let d = rx.next(5).await;
    assert_eq!(d.headers["ce-subject"], "good-1");
    // The stalled client is cut off after idle_timeout; its half line is not stored.
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), stalled.read(&mut byte))
        .await
        .expect("the stalled connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    rx.nothing_for(300).await;
    assert_eq!(rejected(&r, "invalid_utf8").await, 1);
    assert_eq!(rejected(&r, "oversized").await, 1);
    assert_eq!(rejected(&r, "stalled").await, 1);
    // The listener goes on serving.
    c.write_all(b"<13>Nov 30 10:00:01 h sshd: VM good-2 is compromised\n")
        .await
        .unwrap();
    assert_eq!(rx.next(5).await.headers["ce-subject"], "good-2");
    r.stop().await;
}

/// Slack's signing scheme written from its documentation: `v0=` and the hex HMAC-SHA256 of
/// `v0:{timestamp}:{body}` with the app's signing secret.
pub(crate) fn slack_signature(secret: &str, ts: i64, body: &str) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{ts}:{body}").as_bytes());
    let bytes = mac.finalize().into_bytes();
    format!(
        "v0={}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

#[test]
fn the_reference_slack_signature_matches_slacks_documentation() {
    // The sample request of Slack's "Verifying requests from Slack".
    let body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    assert_eq!(
        slack_signature("8f742231b10e8888abcd99yyyzzz85a5", 1531420618, body),
        "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
    );
}

pub(crate) const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";

fn slack_command(text: &str, user: &str, trigger: &str) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("token", "legacy")
        .append_pair("team_id", "T1DC2JH3J")
        .append_pair("channel_id", "C0OPS")
        .append_pair("channel_name", "ops")
        .append_pair("user_id", user)
        .append_pair("user_name", "roadrunner")
        .append_pair("command", "/iaas")
        .append_pair("text", text)
        .append_pair(
            "response_url",
            "https://hooks.slack.com/commands/T1DC2JH3J/1/abc",
        )
        .append_pair("trigger_id", trigger)
        .finish()
}

async fn post_slack(r: &Reflex, body: &str, ts: i64, sig: &str) -> reqwest::Response {
    r.client
        .post(format!("{}/slack", r.http))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", ts.to_string())
        .header("x-slack-signature", sig)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// Seed 001's ChatOps: a signed slash command becomes an event with its verb and args and
/// is acknowledged at once; tampered, stale and replayed requests are refused; an unknown
/// verb gets the help and a user without the right gets the reason, neither an event.
#[tokio::test]
async fn slack_commands_are_verified_parsed_and_permitted() {
    let mut rx = Receiver::start().await;
    std::env::set_var("REFLEX_IT_SLACK_SECRET", SLACK_SECRET);
    let yaml = format!(
        r#"
store: {{path: $DIR/reflex.db}}
sources:
  - name: chatops
    type: slack
    path: /slack
    signing_secret: ${{env:REFLEX_IT_SLACK_SECRET}}
    verbs:
      clone: {{help: "clone VM as NEW", users: [U2CERLKJA]}}
      status: {{help: "status VM"}}
triggers:
  - name: commands
    filters: [{{prefix: {{type: com.reflex.slack.}}}}]
    action: {{type: http, url: "{}"}}
"#,
        rx.url()
    );
    let r = Reflex::start(&yaml).await;
    let now = chrono::Utc::now().timestamp();

    let body = slack_command("clone web-01 as web-02", "U2CERLKJA", "t-1");
    let resp = post_slack(&r, &body, now, &slack_signature(SLACK_SECRET, now, &body)).await;
    assert_eq!(resp.status(), 200);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["response_type"], "ephemeral");
    assert!(answer["text"]
        .as_str()
        .unwrap()
        .contains("clone web-01 as web-02"));
    let d = rx.next(5).await;
    assert_eq!(d.headers["ce-type"], "com.reflex.slack.command");
    assert_eq!(d.headers["ce-subject"], "clone");
    let data: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    assert_eq!(data["args"], serde_json::json!(["web-01", "as", "web-02"]));
    assert_eq!(data["user"], "U2CERLKJA");
    assert_eq!(
        data["response_url"],
        "https://hooks.slack.com/commands/T1DC2JH3J/1/abc"
    );

    // The same request again: replayed.
    let resp = post_slack(&r, &body, now, &slack_signature(SLACK_SECRET, now, &body)).await;
    assert_eq!(resp.status(), 409);
    // Tampered: the text changed after signing (a request not seen before).
    let fresh = slack_command("clone web-01 as web-02", "U2CERLKJA", "t-6");
    let tampered = fresh.replace("web-02", "web-03");
    let resp = post_slack(
        &r,
        &tampered,
        now,
        &slack_signature(SLACK_SECRET, now, &fresh),
    )
    .await;
    assert_eq!(resp.status(), 401);
    // Stale: signed six minutes ago.
    let old = now - 360;
    let body2 = slack_command("status web-01", "U2CERLKJA", "t-2");
    let resp = post_slack(&r, &body2, old, &slack_signature(SLACK_SECRET, old, &body2)).await;
    assert_eq!(resp.status(), 401);
    // Another user may not clone; anyone may ask the status; an unknown verb gets the help.
    let body3 = slack_command("clone web-01 as web-09", "U0OTHER", "t-3");
    let resp = post_slack(&r, &body3, now, &slack_signature(SLACK_SECRET, now, &body3)).await;
    assert_eq!(resp.status(), 200);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert!(
        answer["text"]
            .as_str()
            .unwrap()
            .contains("may not use `clone`"),
        "{answer}"
    );
    let body4 = slack_command("reboot web-01", "U2CERLKJA", "t-4");
    let resp = post_slack(&r, &body4, now, &slack_signature(SLACK_SECRET, now, &body4)).await;
    let answer: serde_json::Value = resp.json().await.unwrap();
    let help = answer["text"].as_str().unwrap();
    assert!(
        help.contains("Unknown verb `reboot`") && help.contains("`status` — status VM"),
        "{help}"
    );
    let body5 = slack_command("status web-01", "U0OTHER", "t-5");
    let resp = post_slack(&r, &body5, now, &slack_signature(SLACK_SECRET, now, &body5)).await;
    assert_eq!(resp.status(), 200);
    let d = rx.next(5).await;
    assert_eq!(d.headers["ce-subject"], "status");
    // An interactive payload (a button pressed) is an interaction event.
    let body6 = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", r#"{"type":"block_actions","trigger_id":"t-7","user":{"id":"U2CERLKJA"},"actions":[{"action_id":"approve"}]}"#)
        .finish();
    let resp = post_slack(&r, &body6, now, &slack_signature(SLACK_SECRET, now, &body6)).await;
    assert_eq!(resp.status(), 200);
    let d = rx.next(5).await;
    assert_eq!(d.headers["ce-type"], "com.reflex.slack.interaction");
    assert_eq!(d.headers["ce-subject"], "block_actions");
    let data: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    assert_eq!(data["actions"][0]["action_id"], "approve");
    rx.nothing_for(300).await;
    r.stop().await;
}

/// Syslog over TLS (RFC 5425): a client trusting the listener's certificate sends an
/// octet-counted frame and it is stored; a client speaking plain TCP to the TLS port gets
/// its connection closed, counted, and stores nothing.
#[tokio::test]
async fn syslog_over_tls() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::common::localhost_cert(dir.path());
    let tcp = crate::e2e_binary::free_port();
    let mut rx = Receiver::start().await;
    let yaml = format!(
        r#"
store: {{path: $DIR/reflex.db}}
sources:
  - name: logs
    type: syslog
    tcp: 127.0.0.1:{tcp}
    idle_timeout: 2s
    tls: {{cert_file: "{}", key_file: "{}"}}
    rules:
      - {{match: 'VM (?P<vm>\S+) is compromised', event_type: security.compromised, subject: "{{{{ captures.vm }}}}"}}
triggers:
  - name: all
    action: {{type: http, url: "{}"}}
"#,
        cert.display(),
        key.display(),
        rx.url()
    );
    let r = Reflex::start(&yaml).await;
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    // Plain TCP to the TLS port: refused by the handshake, nothing stored.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", tcp))
        .await
        .unwrap();
    plain
        .write_all(b"<13>Nov 30 10:00:00 h sshd: VM plain-1 is compromised\n")
        .await
        .unwrap();
    let tcp_stream = tokio::net::TcpStream::connect(("127.0.0.1", tcp))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp_stream).await.unwrap();
    let msg = "<34>1 2026-11-30T10:00:00Z h sshd - - - VM tls-1 is compromised";
    tls.write_all(format!("{} {msg}", msg.len()).as_bytes())
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let d = rx.next(5).await;
    assert_eq!(d.headers["ce-subject"], "tls-1");
    rx.nothing_for(500).await;
    assert_eq!(rejected(&r, "tls").await, 1);
    r.stop().await;
}
