//! Reloading the configuration on the same sockets: events keep flowing, every acknowledged
//! one is delivered, and a file with errors changes nothing.

use crate::common::{cloudevent, Receiver};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn config(dir: &std::path::Path, http: u16, api: u16, url: &str) -> String {
    format!(
        r#"
http: {{listen: "127.0.0.1:{http}"}}
api: {{listen: "127.0.0.1:{api}"}}
store: {}
sources:
  - {{name: ce, type: cloudevents, path: /events}}
triggers:
  - name: fn
    action: {{type: http, url: "{url}"}}
"#,
        crate::common::store_config(dir)
    )
}

/// reflex running from a file, with reloads, on two port-0 listeners.
struct FromFile {
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    hp: u16,
    ap: u16,
    client: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl FromFile {
    /// Starts on the file that `write(dir, http_port, api_port)` returns.
    async fn start(write: impl Fn(&std::path::Path, u16, u16) -> String) -> FromFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reflex.yaml");
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (hp, ap) = (
            http.local_addr().unwrap().port(),
            api.local_addr().unwrap().port(),
        );
        std::fs::write(&path, write(dir.path(), hp, ap)).unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(reflex::run_with_reload(
            reflex::compile_file(&path).unwrap(),
            reflex::Listeners { http, api },
            shutdown.clone(),
            Some(reflex::Reload::new(path.clone())),
        ));
        let f = FromFile {
            dir,
            path,
            hp,
            ap,
            client: reqwest::Client::new(),
            shutdown,
            task,
        };
        f.ready().await;
        f
    }

    fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.ap)
    }

    async fn ready(&self) {
        for _ in 0..200 {
            let r = self
                .client
                .get(format!("{}/readyz", self.api()))
                .send()
                .await;
            if r.is_ok_and(|r| r.status() == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("reflex did not become ready");
    }

    async fn reload(&self) -> reqwest::Response {
        self.client
            .post(format!("{}/api/v1/reload", self.api()))
            .send()
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn ids(received: &mut Receiver, into: &mut BTreeSet<String>) {
    while let Ok(r) = received.rx.try_recv() {
        into.insert(r.headers["ce-id"].to_str().unwrap().to_string());
    }
}

#[tokio::test]
async fn reload_keeps_every_acknowledged_event_and_refuses_a_bad_file() {
    let mut old = Receiver::start().await;
    let mut new = Receiver::start().await;
    let r = FromFile::start(|dir, hp, ap| config(dir, hp, ap, &old.url())).await;
    let (dir, path, hp, ap) = (r.dir.path(), r.path.clone(), r.hp, r.ap);
    let (client, api_url) = (&r.client, r.api());

    // A sender posts steadily through the reload.
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let refused = Arc::new(Mutex::new(Vec::new()));
    let sender = {
        let (client, accepted, refused) = (r.client.clone(), accepted.clone(), refused.clone());
        tokio::spawn(async move {
            for i in 0..300 {
                let id = format!("r-{i}");
                let resp = client
                    .post(format!("http://127.0.0.1:{hp}/events"))
                    .header("content-type", "application/cloudevents+json")
                    .body(cloudevent(&id, "t", serde_json::json!({"i": i})))
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == 202 => {
                        accepted.lock().unwrap().insert(id);
                    }
                    Ok(r) => refused
                        .lock()
                        .unwrap()
                        .push(format!("{id}: HTTP {}", r.status())),
                    Err(e) => refused.lock().unwrap().push(format!("{id}: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&path, config(dir, hp, ap, &new.url())).unwrap();
    let resp = r.reload().await;
    assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    sender.await.unwrap();

    // Every acknowledged event reached the old or the new receiver; the new one got the later ones.
    let accepted = accepted.lock().unwrap().clone();
    let (mut got_old, mut got_new) = (BTreeSet::new(), BTreeSet::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !accepted.is_subset(&got_old.union(&got_new).cloned().collect()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered: {:?}",
            accepted
                .difference(&got_old.union(&got_new).cloned().collect())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        ids(&mut old, &mut got_old);
        ids(&mut new, &mut got_new);
    }
    assert!(
        accepted.contains("r-299"),
        "the sender's last event was accepted"
    );
    assert!(got_new.contains("r-299") && !got_old.contains("r-299"));
    assert!(
        !got_old.is_empty(),
        "events before the reload went to the old URL"
    );
    eprintln!(
        "reload: {} accepted, {} to the old URL, {} to the new, not accepted: {:?}",
        accepted.len(),
        got_old.len(),
        got_new.len(),
        refused.lock().unwrap()
    );

    // A file with errors is refused with its positions; the running configuration stays.
    std::fs::write(&path, "sources:\n  - {name: ce, type: nope}\n").unwrap();
    let resp = r.reload().await;
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["reason"], "invalid_config");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reflex.yaml:2:"),
        "{body}"
    );
    // So is a file that moves the listener.
    std::fs::write(&path, config(dir, hp + 1, ap, &new.url())).unwrap();
    let resp = r.reload().await;
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("http.listen cannot change"),
        "{body}"
    );
    let resp = client
        .post(format!("http://127.0.0.1:{hp}/events"))
        .header("content-type", "application/cloudevents+json")
        .body(cloudevent("after-bad", "t", serde_json::json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(new.next(5).await.headers["ce-id"], "after-bad");

    // Two reloads at once: each gets an answer (the second may be told one is in progress),
    // and the server carries on.
    std::fs::write(&path, config(dir, hp, ap, &old.url())).unwrap();
    let post = || client.post(format!("{api_url}/api/v1/reload")).send();
    let (a, b) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(post(), post())
    })
    .await
    .expect("concurrent reloads were answered");
    // A request caught on a connection that the graceful stop closes gets an error and can
    // be sent again; none waits forever.
    let codes: Vec<u16> = [a, b]
        .into_iter()
        .filter_map(|r| r.ok().map(|r| r.status().as_u16()))
        .collect();
    assert!(codes.contains(&202), "{codes:?}");
    assert!(codes.iter().all(|c| [202, 400].contains(c)), "{codes:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = client
            .post(format!("http://127.0.0.1:{hp}/events"))
            .header("content-type", "application/cloudevents+json")
            .body(cloudevent("after-two", "t", serde_json::json!({})))
            .send()
            .await;
        if resp.is_ok_and(|r| r.status() == 202) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no intake after two reloads"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(old.next(5).await.headers["ce-id"], "after-two");

    r.stop().await;
}

#[tokio::test]
async fn a_request_that_outlives_the_drain_is_refused_not_lost() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rcv = Receiver::start().await;
    // Requests in progress get 300 ms when the pipeline stops.
    let with_drain = |dir: &std::path::Path, hp: u16, ap: u16| {
        config(dir, hp, ap, &rcv.url()).replace(
            &format!("listen: \"127.0.0.1:{hp}\""),
            &format!("listen: \"127.0.0.1:{hp}\", drain: 300ms"),
        )
    };
    let r = FromFile::start(with_drain).await;
    let (hp, client, api_url) = (r.hp, &r.client, r.api());

    // A sender starts a request and stalls half-way through the body.
    let body = cloudevent("straggler", "t", serde_json::json!({"pad": "x".repeat(64)}));
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", hp))
        .await
        .unwrap();
    let head = format!(
        "POST /events HTTP/1.1\r\nhost: x\r\ncontent-type: application/cloudevents+json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body.as_bytes()[..20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // A reload happens; the drain gives up on the stalled request after 300 ms.
    std::fs::write(&r.path, with_drain(r.dir.path(), r.hp, r.ap)).unwrap();
    assert_eq!(r.reload().await.status(), 202);
    tokio::time::sleep(Duration::from_millis(200)).await;
    r.ready().await;

    // The sender finishes: refused (retry), not acknowledged by a pipeline that is gone.
    conn.write_all(&body.as_bytes()[20..]).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 503"),
        "a straggler must not be acknowledged: {answer}"
    );
    let found: serde_json::Value = client
        .get(format!("{api_url}/api/v1/events?id=straggler"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        found["events"],
        serde_json::json!([]),
        "nothing stored, so nothing to lose"
    );
    eprintln!("straggler answer: {:?}", answer.lines().next());
    r.stop().await;
}

/// A syslog source across a reload: the old pipeline lets its socket go before the new one
/// binds the same address, and lines sent after the reload follow the new rules.
#[tokio::test]
async fn a_syslog_source_rebinds_its_socket_across_a_reload() {
    use tokio::io::AsyncWriteExt;
    let mut rx = Receiver::start().await;
    let tcp = crate::e2e_binary::free_port();
    let url = rx.url();
    let write = |dir: &std::path::Path, hp: u16, ap: u16, ty: &str| {
        format!(
            r#"
http: {{listen: "127.0.0.1:{hp}"}}
api: {{listen: "127.0.0.1:{ap}"}}
store: {}
sources:
  - name: logs
    type: syslog
    tcp: 127.0.0.1:{tcp}
    rules: [{{match: 'VM (?P<vm>\S+)', event_type: {ty}, subject: "{{{{ captures.vm }}}}"}}]
triggers:
  - name: fn
    action: {{type: http, url: "{url}"}}
"#,
            crate::common::store_config(dir)
        )
    };
    let r = FromFile::start(|dir, hp, ap| write(dir, hp, ap, "before.reload")).await;
    let send = |line: &'static str| async move {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", tcp))
            .await
            .unwrap();
        c.write_all(line.as_bytes()).await.unwrap();
        c.shutdown().await.unwrap();
    };
    send("<13>Nov 30 10:00:00 h app: VM one\n").await;
    let d = rx.next(5).await;
    assert_eq!(d.headers["ce-type"], "before.reload");
    std::fs::write(&r.path, write(r.dir.path(), r.hp, r.ap, "after.reload")).unwrap();
    assert_eq!(r.reload().await.status(), 202);
    // Lines keep coming through the reload (a connection may be refused while the
    // pipelines change); one sent after it follows the new rule.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no line got the new rule"
        );
        if let Ok(mut c) = tokio::net::TcpStream::connect(("127.0.0.1", tcp)).await {
            let _ = c.write_all(b"<13>Nov 30 10:00:01 h app: VM two\n").await;
            let _ = c.shutdown().await;
        }
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(200), rx.rx.recv()).await {
            if d.headers["ce-type"] == "after.reload" {
                assert_eq!(d.headers["ce-subject"], "two");
                break;
            }
        }
    }
    r.stop().await;
}
