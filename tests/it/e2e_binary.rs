//! The real binary: a user's path (run, curl, see the action, CLI, SIGTERM) and a crash
//! under load (SIGKILL, restart: every event that got a 202 is delivered at least once).

use crate::common::Receiver;
use serde_json::json;
use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_reflex");

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    http: String,
    api: String,
}

/// A test that fails midway leaves no server running behind it (a later run of the suite
/// would meet its database connections and its ports).
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(config: &Path, http: u16, api: u16) -> Server {
    let child = Command::new(BIN)
        .args(["run", "-c"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Server {
        child,
        http: format!("http://127.0.0.1:{http}"),
        api: format!("http://127.0.0.1:{api}"),
    }
}

pub(crate) async fn wait_ready(api: &str) {
    assert!(
        is_ready(api).await,
        "the reflex binary did not become ready"
    );
}

/// Whether the binary answers `/readyz` within about 6 s.
pub(crate) async fn is_ready(api: &str) -> bool {
    let c = reqwest::Client::new();
    for _ in 0..300 {
        if let Ok(r) = c.get(format!("{api}/readyz")).send().await {
            if r.status() == 200 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn write_config(dir: &Path, http: u16, api: u16, url: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("reflex.yaml");
    std::fs::write(
        &path,
        format!(
            r#"
http: {{listen: "127.0.0.1:{http}"}}
api: {{listen: "127.0.0.1:{api}"}}
store: {}
sources:
  - name: alerts
    type: webhook
    path: /hooks/alerts
    mapping: {{type: "alert.{{{{ body.alert }}}}", subject: "{{{{ body.vm }}}}", id: "{{{{ body.id }}}}"}}
triggers:
  - name: fn
    action: {{type: http, url: "{url}"}}
    delivery: {{concurrency: 32, backoff: 50ms, max_backoff: 500ms, max_attempts: 50}}
{extra}
"#,
            crate::common::store_config(&dir.join("data"))
        ),
    )
    .unwrap();
    path
}

fn cli(api: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("REFLEX_API", api)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn user_path_with_the_real_binary() {
    let mut rcv = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (http, api) = (free_port(), free_port());
    let cfg = write_config(dir.path(), http, api, &rcv.url(), "");
    let (ok, out) = cli("", &["check", "-c", cfg.to_str().unwrap()]);
    assert!(ok, "{out}");
    let s = spawn(&cfg, http, api);
    wait_ready(&s.api).await;
    let c = reqwest::Client::new();
    let resp = c
        .post(format!("{}/hooks/alerts", s.http))
        .json(&json!({"alert": "disk_full", "vm": "web-01", "id": "u-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let got = rcv.next(5).await;
    assert_eq!(got.headers["ce-type"], "alert.disk_full");
    assert_eq!(got.headers["ce-subject"], "web-01");

    let api_url = s.api.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        cli(
            &api_url,
            &[
                "send",
                "--type",
                "t.cli",
                "--subject",
                "vm-2",
                "--data",
                r#"{"a":1}"#,
            ],
        )
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    let got = rcv.next(5).await;
    assert_eq!(got.headers["ce-type"], "t.cli");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let api_url = s.api.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        cli(&api_url, &["deliveries", "list", "--state", "succeeded"])
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("u-1") && out.contains("succeeded"), "{out}");
    let api_url = s.api.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || cli(&api_url, &["events", "list"]))
        .await
        .unwrap();
    assert!(
        ok && out.contains("alert.disk_full") && out.contains("t.cli"),
        "{out}"
    );
    let api_url = s.api.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || cli(&api_url, &["replay", "--all-dead"]))
        .await
        .unwrap();
    assert!(ok && out.contains("no dead deliveries"), "{out}");

    // `reflex tail` follows new events that match its filter. It starts after the newest
    // event stored when it starts, so send until it shows one.
    struct Tail(std::process::Child);
    impl Drop for Tail {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut tail = Tail(
        Command::new(BIN)
            .args(["tail", "--type", "alert.tailed", "--json"])
            .env("REFLEX_API", &s.api)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = tail.0.stdout.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tail printed nothing"
        );
        let n = next_n();
        for (alert, id) in [("other", format!("o-{n}")), ("tailed", format!("t-{n}"))] {
            let resp = c
                .post(format!("{}/hooks/alerts", s.http))
                .json(&json!({"alert": alert, "vm": "web-02", "id": id}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 202);
        }
        if let Ok(Some(line)) = tokio::time::timeout(Duration::from_millis(700), lines.recv()).await
        {
            break line;
        }
    };
    let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ev["type"], "alert.tailed", "{ev}");
    drop(tail);
    while tokio::time::timeout(Duration::from_millis(300), rcv.rx.recv())
        .await
        .is_ok()
    {}

    // SIGHUP re-reads the file: the trigger now calls another URL, on the same sockets.
    let mut moved = Receiver::start().await;
    write_config(dir.path(), http, api, &moved.url(), "");
    unsafe { libc::kill(s.child.id() as i32, libc::SIGHUP) };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        // During the reload an idle keep-alive connection may be closed under a request,
        // or an event refused with 503: a sender retries, as here.
        let resp = c
            .post(format!("{}/hooks/alerts", s.http))
            .json(&json!({"alert": "after_hup", "vm": "web-01", "id": format!("h-{n}")}))
            .send()
            .await;
        if !resp.is_ok_and(|r| r.status() == 202) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no intake after SIGHUP"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let to_moved = tokio::time::timeout(Duration::from_millis(200), moved.rx.recv()).await;
        if to_moved.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
    }

    // SIGTERM: a clean, prompt exit.
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || {
        {
            let mut s = s;
            s.child.wait()
        }
        .unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn sigkill_under_load_loses_no_acknowledged_event() {
    let mut rcv = Receiver::start().await;
    let received: Arc<Mutex<HashSet<String>>> = Arc::default();
    let dir = tempfile::tempdir().unwrap();
    let (http, api) = (free_port(), free_port());
    let cfg = write_config(dir.path(), http, api, &rcv.url(), "");
    let mut s = spawn(&cfg, http, api);
    wait_ready(&s.api).await;

    {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(r) = rcv.rx.recv().await {
                received
                    .lock()
                    .unwrap()
                    .insert(r.headers["ce-id"].to_str().unwrap().to_string());
            }
        });
    }
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for w in 0..8 {
        let acked = acked.clone();
        let stop = stop.clone();
        let url = format!("{}/hooks/alerts", s.http);
        load.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            let mut i = 0;
            while !stop.is_cancelled() {
                let id = format!("w{w}-{i}");
                i += 1;
                let r = c
                    .post(&url)
                    .json(&json!({"alert": "a", "vm": "v", "id": id}))
                    .send()
                    .await;
                if let Ok(r) = r {
                    if r.status() == 202 {
                        acked.lock().unwrap().insert(id);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.child.kill().unwrap(); // SIGKILL
    let _ = tokio::task::spawn_blocking(move || {
        let mut s = s;
        s.child.wait()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    for l in load {
        l.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "too little load to prove anything: {}",
        acked.len()
    );

    let s = spawn(&cfg, http, api);
    wait_ready(&s.api).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let missing: Vec<String> = acked
            .difference(&received.lock().unwrap())
            .cloned()
            .collect();
        if missing.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{} acknowledged events never delivered, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "crash test: {} events acknowledged before SIGKILL, all delivered after restart",
        acked.len()
    );
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    // Wait off the runtime: the receiver must keep answering while reflex drains.
    let status = tokio::task::spawn_blocking(move || {
        {
            let mut s = s;
            s.child.wait()
        }
        .unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
}

/// A fresh id for each event a test sends in a loop.
fn next_n() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// `reflex check` warns about a source without authentication on a listener beyond
/// loopback (and still passes the file); on loopback it says nothing.
#[test]
fn check_warns_about_unauthenticated_sources_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let write = |listen: &str| {
        let path = dir
            .path()
            .join(format!("{}.yaml", listen.replace([':', '.'], "_")));
        std::fs::write(
            &path,
            format!(
                r#"http: {{listen: "{listen}"}}
sources:
  - {{name: open-hook, type: webhook, path: /h}}
  - {{name: signed, type: webhook, path: /s, auth: {{type: bearer, token: t0ken}}}}
"#
            ),
        )
        .unwrap();
        path
    };
    let public = write("0.0.0.0:8080");
    let (ok, out) = cli("", &["check", "-c", public.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: source `open-hook` accepts events without authentication"),
        "{out}"
    );
    assert!(!out.contains("`signed`"), "{out}");
    let local = write("127.0.0.1:8080");
    let (ok, out) = cli("", &["check", "-c", local.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(!out.contains("warning"), "{out}");
}

/// The CLI with an API token (`REFLEX_API_TOKEN`), and standard input.
fn cli_as(api: &str, token: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .env("REFLEX_API", api)
        .env("REFLEX_API_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn users_tokens_and_the_audit_log_with_the_real_binary() {
    let rcv = Receiver::start().await;
    // A password hash from stdin; a short password is refused.
    let (ok, hash, err) = cli_as("", "", &["user", "hash"], "cli-pa55word\n");
    assert!(ok, "{err}");
    let hash = hash.trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(reflex::api::auth::verify_password(&hash, "cli-pa55word"));
    let (ok, _, err) = cli_as("", "", &["user", "hash"], "short\n");
    assert!(!ok && err.contains("shorter than 8"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let (http, api) = (free_port(), free_port());
    let admin = "b1nary-adm1n-t0ken";
    let cfg = write_config(dir.path(), http, api, &rcv.url(), "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("api: {{listen: \"127.0.0.1:{api}\"}}"),
        &format!(
            "api: {{listen: \"127.0.0.1:{api}\", token: {admin}, users: [{{name: cleo, role: operator, password_hash: \"{hash}\"}}]}}"
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let (ok, out) = cli("", &["check", "-c", cfg.to_str().unwrap()]);
    assert!(ok, "{out}");
    let mut s = spawn(&cfg, http, api);
    wait_ready(&s.api).await;

    // An admin makes cleo a token; it is printed once, on stdout alone.
    let (ok, token, err) = cli_as(
        &s.api,
        admin,
        &["tokens", "create", "--user", "cleo", "--label", "nightly"],
        "",
    );
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    assert!(token.starts_with("rfx_"), "{token}");
    assert!(err.contains("for cleo (operator)"), "{err}");
    // cleo may pause a trigger, not list tokens.
    let (ok, out, err) = cli_as(&s.api, &token, &["triggers", "pause", "fn"], "");
    assert!(ok, "{out}{err}");
    let (ok, _, err) = cli_as(&s.api, &token, &["tokens"], "");
    assert!(!ok && err.contains("needs the admin role"), "{err}");
    // The audit log shows who did it.
    let (ok, log, err) = cli_as(&s.api, admin, &["audit", "--json"], "");
    assert!(ok, "{err}");
    let entries: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        entries.iter().any(|e| e["actor"] == "cleo"
            && e["action"] == "trigger.pause"
            && e["detail"] == "200 OK"),
        "{log}"
    );
    // Revoked: the token stops working at once, and the list shows it revoked.
    let (ok, list, _) = cli_as(&s.api, admin, &["tokens"], "");
    assert!(ok);
    let id = list
        .lines()
        .find(|l| l.contains("cleo"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let (ok, out, err) = cli_as(&s.api, admin, &["tokens", "revoke", &id], "");
    assert!(ok, "{out}{err}");
    let (ok, _, err) = cli_as(&s.api, &token, &["triggers"], "");
    assert!(!ok && err.contains("401"), "{err}");
    assert!(!list.contains(&token));
    let _ = s.child.kill();
    let _ = s.child.wait();
}
