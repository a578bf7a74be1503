//! The notify actions against local receivers standing in for Slack, Teams, PagerDuty and a
//! Standard Webhooks consumer: what each receives is checked field by field, the signature
//! verified, Slack's `ok: false` refused, and no secret appears in any record.

use crate::common::{Receiver, Reflex};
use serde_json::json;

#[tokio::test]
async fn notifications_reach_slack_teams_pagerduty_and_a_signed_webhook() {
    let mut hook = Receiver::start().await;
    let mut api = Receiver::start_with_reply(Some((
        vec![("content-type", "application/json".into())],
        json!({"ok": true, "ts": "1.2"}).to_string(),
    )))
    .await;
    let mut refusing = Receiver::start_with_reply(Some((
        vec![("content-type", "application/json".into())],
        json!({"ok": false, "error": "channel_not_found"}).to_string(),
    )))
    .await;
    let mut teams = Receiver::start().await;
    let mut pd = Receiver::start().await;
    let mut signed = Receiver::start().await;
    std::env::set_var(
        "REFLEX_IT_SLACK_HOOK",
        hook.url() + "/T000/B000/s3cr3tHookPath",
    );
    std::env::set_var("REFLEX_IT_SLACK_TOKEN", "xoxb-s3cr3t-b0t-t0ken");
    std::env::set_var("REFLEX_IT_PD_KEY", "pd-r0uting-k3y-0123456789");
    std::env::set_var("REFLEX_IT_WHSEC", "whsec_c2VjcmV0LWZvci10aGUtd2ViaG9vaw==");
    let base = |r: &Receiver| format!("http://{}", r.addr);
    let r = Reflex::start(&format!(
        r##"
sources:
  - {{name: am, type: cloudevents, path: /ce}}
triggers:
  - name: slack-hook
    filters: [{{exact: {{type: alert.firing}}}}]
    action:
      type: notify.slack
      webhook_url: ${{env:REFLEX_IT_SLACK_HOOK}}
      text: ":red_circle: {{{{ event.subject }}}} is {{{{ event.data.state }}}}"
      blocks: '[{{"type": "section", "text": {{"type": "mrkdwn", "text": "*{{{{ event.subject }}}}*"}}}}]'
  - name: slack-api
    filters: [{{exact: {{type: alert.firing}}}}]
    action: {{type: notify.slack, token: "${{env:REFLEX_IT_SLACK_TOKEN}}", channel: "#ops", text: "{{{{ event.subject }}}}", api_url: "{api}/api"}}
  - name: slack-refused
    filters: [{{exact: {{type: alert.firing}}}}]
    action: {{type: notify.slack, token: "${{env:REFLEX_IT_SLACK_TOKEN}}", channel: "#nowhere", text: x, api_url: "{refusing}/api"}}
    delivery: {{max_attempts: 3}}
  - name: teams
    filters: [{{exact: {{type: alert.firing}}}}]
    action: {{type: notify.teams, webhook_url: "{teams}/webhookb2/abc", title: "Alert on {{{{ event.subject }}}}", text: "state **{{{{ event.data.state }}}}**"}}
  - name: pagerduty
    filters: [{{prefix: {{type: alert.}}}}]
    action:
      type: notify.pagerduty
      routing_key: ${{env:REFLEX_IT_PD_KEY}}
      url: "{pd}/v2/enqueue"
      event_action: "{{{{ 'resolve' if event.type == 'alert.resolved' else 'trigger' }}}}"
      dedup_key: "reflex-{{{{ event.subject }}}}"
      summary: "{{{{ event.subject }}}} is {{{{ event.data.state }}}}"
      severity: critical
  - name: signed
    filters: [{{exact: {{type: alert.firing}}}}]
    action: {{type: notify.webhook, url: "{signed}/in", secret: "${{env:REFLEX_IT_WHSEC}}"}}
"##,
        api = base(&api),
        refusing = base(&refusing),
        teams = base(&teams),
        pd = base(&pd),
        signed = base(&signed),
    ))
    .await;
    let post = |id: &str, ty: &str, state: &str| {
        let body = json!({"specversion": "1.0", "id": id, "source": "/am", "type": ty, "subject": "db-01", "data": {"state": state}}).to_string();
        let r = &r;
        async move { crate::common::post_ce(r, "/ce", body).await }
    };
    assert_eq!(post("a-1", "alert.firing", "down").await.status(), 202);

    let m = hook.next(10).await;
    let v: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    assert_eq!(v["text"], ":red_circle: db-01 is down");
    assert_eq!(v["blocks"][0]["text"]["text"], "*db-01*");

    let m = api.next(10).await;
    assert_eq!(m.headers["authorization"], "Bearer xoxb-s3cr3t-b0t-t0ken");
    let v: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    assert_eq!(
        (v["channel"].as_str(), v["text"].as_str()),
        (Some("#ops"), Some("db-01"))
    );

    let m = teams.next(10).await;
    let v: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    assert_eq!(v["@type"], "MessageCard");
    assert_eq!(v["title"], "Alert on db-01");
    assert_eq!(v["text"], "state **down**");

    let m = pd.next(10).await;
    let v: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    assert_eq!(v["routing_key"], "pd-r0uting-k3y-0123456789");
    assert_eq!(v["event_action"], "trigger");
    assert_eq!(v["dedup_key"], "reflex-db-01");
    assert_eq!(v["payload"]["severity"], "critical");
    assert_eq!(v["payload"]["summary"], "db-01 is down");

    let m = signed.next(10).await;
    let (id, ts) = (
        m.headers["webhook-id"].to_str().unwrap().to_string(),
        m.headers["webhook-timestamp"]
            .to_str()
            .unwrap()
            .parse::<i64>()
            .unwrap(),
    );
    assert_eq!(
        m.headers["webhook-signature"].to_str().unwrap(),
        reflex::sources::auth::sign_standard(
            "whsec_c2VjcmV0LWZvci10aGUtd2ViaG9vaw==",
            &id,
            ts,
            &m.body
        )
    );
    let v: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    assert_eq!(v["id"], "a-1");

    // Resolving ties to the same dedup key.
    assert_eq!(post("a-2", "alert.resolved", "up").await.status(), 202);
    let m = pd.next(10).await;
    let v: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    assert_eq!(
        (v["event_action"].as_str(), v["dedup_key"].as_str()),
        (Some("resolve"), Some("reflex-db-01"))
    );
    assert!(v.get("payload").is_none(), "{v}");

    // Slack's `ok: false` is a failed delivery, permanent for a missing channel.
    refusing.next(10).await;
    let dead = r
        .wait_deliveries("trigger=slack-refused&state=dead", 20, |l| l.len() == 1)
        .await;
    assert_eq!(dead[0]["attempts"], 1);
    assert!(dead[0]["last_error"]
        .as_str()
        .unwrap()
        .contains("channel_not_found"));

    r.wait_deliveries("state=succeeded", 20, |l| l.len() == 6)
        .await;
    let list = r.api_get("/api/v1/deliveries?limit=100").await;
    let mut answers = list.to_string();
    for d in list["deliveries"].as_array().unwrap() {
        answers.push_str(
            &r.api_get(&format!("/api/v1/deliveries/{}", d["id"]))
                .await
                .to_string(),
        );
    }
    for secret in [
        "s3cr3tHookPath",
        "xoxb-s3cr3t-b0t-t0ken",
        "pd-r0uting-k3y-0123456789",
        "c2VjcmV0LWZvci10aGUtd2ViaG9vaw",
    ] {
        assert!(!answers.contains(secret), "{secret} leaked: {answers}");
    }
    r.stop().await;
}

/// What the stand-in mail relay received: one JSON object per message.
type Mails = std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>;

/// A mail relay standing in for a real one: a real SMTP conversation (EHLO, STARTTLS, AUTH
/// PLAIN, MAIL, RCPT, DATA) that offers STARTTLS when `starttls` and refuses everything but
/// EHLO/STARTTLS/QUIT before it; `nobody@…` is an unknown recipient (550).
async fn smtp_relay(acceptor: tokio_rustls::TlsAcceptor, starttls: bool) -> (u16, Mails) {
    use tokio::io::{AsyncWriteExt, BufReader};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let mails: Mails = Default::default();
    let m = mails.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let (acceptor, mails) = (acceptor.clone(), m.clone());
            tokio::spawn(async move {
                let mut io = BufReader::new(tcp);
                io.get_mut().write_all(b"220 relay ESMTP\r\n").await.ok()?;
                loop {
                    let line = read_line(&mut io).await?;
                    let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" if starttls => b"250-relay\r\n250-STARTTLS\r\n250 8BITMIME\r\n",
                        "EHLO" => b"250-relay\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n",
                        "STARTTLS" if starttls => {
                            io.get_mut().write_all(b"220 go ahead\r\n").await.ok()?;
                            break;
                        }
                        "QUIT" => {
                            io.get_mut().write_all(b"221 bye\r\n").await.ok()?;
                            return Some(());
                        }
                        // A client that goes on without TLS: its password would be seen.
                        "AUTH" => {
                            mails.lock().unwrap().push(json!({"clear_auth": line}));
                            b"530 5.7.0 Must issue a STARTTLS command first\r\n"
                        }
                        _ => b"530 5.7.0 Must issue a STARTTLS command first\r\n",
                    };
                    io.get_mut().write_all(reply).await.ok()?;
                }
                let tls = acceptor.accept(io.into_inner()).await.ok()?;
                let mut io = BufReader::new(tls);
                let mut mail = json!({"tls": true, "rcpt": []});
                loop {
                    let line = read_line(&mut io).await?;
                    let verb = line
                        .split([' ', ':'])
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase();
                    let reply: Vec<u8> = match verb.as_str() {
                        "EHLO" => b"250-relay\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n".to_vec(),
                        "AUTH" => {
                            use base64::Engine;
                            let b64 = line.split(' ').nth(2).unwrap_or("");
                            let plain = base64::engine::general_purpose::STANDARD
                                .decode(b64)
                                .unwrap_or_default();
                            mail["auth"] =
                                json!(String::from_utf8_lossy(&plain).replace('\0', "|"));
                            b"235 2.7.0 ok\r\n".to_vec()
                        }
                        "MAIL" => {
                            mail["from"] = json!(line);
                            b"250 ok\r\n".to_vec()
                        }
                        "RCPT" if line.contains("nobody@") => {
                            b"550 5.1.1 no such user here\r\n".to_vec()
                        }
                        "RCPT" => {
                            mail["rcpt"].as_array_mut().unwrap().push(json!(line));
                            b"250 ok\r\n".to_vec()
                        }
                        "DATA" => {
                            io.get_mut().write_all(b"354 go on\r\n").await.ok()?;
                            let mut data = String::new();
                            loop {
                                let l = read_line(&mut io).await?;
                                if l == "." {
                                    break;
                                }
                                data.push_str(&l);
                                data.push('\n');
                            }
                            mail["data"] = json!(data);
                            mails.lock().unwrap().push(mail.clone());
                            b"250 queued\r\n".to_vec()
                        }
                        "RSET" | "NOOP" => b"250 ok\r\n".to_vec(),
                        "QUIT" => {
                            io.get_mut().write_all(b"221 bye\r\n").await.ok()?;
                            return Some(());
                        }
                        _ => b"502 not here\r\n".to_vec(),
                    };
                    io.get_mut().write_all(&reply).await.ok()?;
                }
            });
        }
    });
    (port, mails)
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Option<String> {
    use tokio::io::AsyncBufReadExt;
    let mut s = String::new();
    match r.read_line(&mut s).await {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(s.trim_end_matches(['\r', '\n']).to_string()),
    }
}

/// `notify.email` over STARTTLS: the message reaches the relay encrypted, with the login
/// made after the upgrade, the templates rendered; without the relay's CA the certificate
/// is refused; a relay that does not offer STARTTLS is refused before the password is
/// sent; an unknown recipient (550) ends the delivery dead at once; the password appears in
/// no record.
#[tokio::test]
async fn email_goes_over_starttls_and_is_refused_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, acceptor) = crate::common::tls_for_localhost(dir.path());
    let (good, mails) = smtp_relay(acceptor.clone(), true).await;
    let (clear, clear_mails) = smtp_relay(acceptor, false).await;
    std::env::set_var("REFLEX_IT_SMTP_PASSWORD", "smtp-s3cret-pa55word");
    let mail = |name: &str, port: u16, ca_file: bool, to: &str| {
        format!(
            r#"
  - name: {name}
    filters: [{{exact: {{type: mail.{name}}}}}]
    action:
      type: notify.email
      host: localhost
      port: {port}
      {ca}
      username: reflex
      password: "${{env:REFLEX_IT_SMTP_PASSWORD}}"
      from: "reflex <reflex@example.com>"
      to: ["{to}"]
      subject: "{{{{ event.data.vm }}}} is {{{{ event.data.state }}}}"
      text: "VM {{{{ event.data.vm }}}} changed to {{{{ event.data.state }}}}."
    delivery: {{max_attempts: 2, backoff: 100ms}}"#,
            ca = if ca_file {
                format!("ca_file: \"{}\"", ca.display())
            } else {
                String::new()
            }
        )
    };
    let r = Reflex::start(&format!(
        "sources:\n  - {{name: ce, type: cloudevents, path: /ce}}\ntriggers:{}{}{}{}\n",
        mail("ok", good, true, "oncall@example.com"),
        mail("untrusted", good, false, "oncall@example.com"),
        mail("clear", clear, true, "oncall@example.com"),
        mail("unknown", good, true, "nobody@example.com"),
    ))
    .await;
    for (i, name) in ["ok", "untrusted", "clear", "unknown"].iter().enumerate() {
        let resp = crate::common::post_ce(
            &r,
            "/ce",
            crate::common::cloudevent(
                &format!("m-{i}"),
                &format!("mail.{name}"),
                json!({"vm": "web-01", "state": "poweredOff"}),
            ),
        )
        .await;
        assert_eq!(resp.status(), 202);
    }
    r.wait_deliveries("trigger=ok&state=succeeded", 20, |l| l.len() == 1)
        .await;
    let got = mails.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:#?}");
    let m = &got[0];
    assert_eq!(m["tls"], true);
    assert_eq!(m["auth"], "|reflex|smtp-s3cret-pa55word", "{m:#}");
    assert!(
        m["rcpt"][0]
            .as_str()
            .unwrap()
            .contains("oncall@example.com"),
        "{m:#}"
    );
    let data = m["data"].as_str().unwrap();
    assert!(data.contains("Subject: web-01 is poweredOff"), "{data}");
    assert!(data.contains("VM web-01 changed to poweredOff."), "{data}");

    let dead = r.wait_deliveries("state=dead", 30, |l| l.len() == 3).await;
    let why = |t: &str| {
        dead.iter()
            .find(|d| d["trigger"] == t)
            .and_then(|d| d["last_error"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        why("untrusted").to_lowercase().contains("certificate"),
        "{}",
        why("untrusted")
    );
    assert!(
        why("clear").to_lowercase().contains("tls"),
        "{}",
        why("clear")
    );
    let unknown = dead.iter().find(|d| d["trigger"] == "unknown").unwrap();
    assert_eq!(unknown["attempts"], 1, "a 550 is not retried: {unknown}");
    assert!(why("unknown").contains("550"), "{}", why("unknown"));
    assert!(
        clear_mails.lock().unwrap().is_empty(),
        "no login in clear text"
    );
    let all = r.api_get("/api/v1/deliveries?limit=100").await.to_string();
    assert!(!all.contains("smtp-s3cret-pa55word"));
    for d in &dead {
        let shown = r.api_get(&format!("/api/v1/deliveries/{}", d["id"])).await;
        assert!(!shown.to_string().contains("smtp-s3cret-pa55word"));
    }
    r.stop().await;
}
