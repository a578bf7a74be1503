//! The console in a real browser: headless Chromium driven through WebDriver (Debian's
//! `chromium` and `chromium-driver`, which the README's test command installs). Each page
//! is saved as a screenshot under `target/ui-screenshots/` for review, at 1280 and 390 px.

use crate::common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::Duration;

const ADMIN_TOKEN: &str = "br0wser-adm1n-t0ken";

/// chromedriver on a free port, stopped with the test.
struct Driver {
    child: tokio::process::Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Driver {
    async fn start() -> Driver {
        let bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        assert!(
            std::path::Path::new(&bin).exists(),
            "{bin} is missing: install Debian's chromium and chromium-driver (the README's test command does)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new(&bin)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            // Its own process group, which Chromium joins: a failed test kills them all.
            .process_group(0)
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Driver {
            child,
            url,
            _profile: tempfile::tempdir().unwrap(),
        }
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900",
                         format!("--user-data-dir={}", self._profile.path().join(uuid::Uuid::new_v4().to_string()).display())]
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("starting Chromium through {}: {e}", self.url))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
        let _ = self.child.start_kill();
    }
}

fn shots() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

async fn sign_in(c: &Client, base: &str, user: &str, password: &str) {
    c.goto(&format!("{base}/ui/overview")).await.unwrap();
    // Not signed in: the sign-in page.
    let field = c.wait().for_element(Locator::Id("user")).await.unwrap();
    field.send_keys(user).await.unwrap();
    c.find(Locator::Id("password"))
        .await
        .unwrap()
        .send_keys(password)
        .await
        .unwrap();
    c.find(Locator::Id("signin"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let who = c.wait().for_element(Locator::Id("who")).await.unwrap();
    assert!(who.text().await.unwrap().starts_with(user));
}

/// What a `fetch` POST from the page answers (a forged request from the page's own origin).
async fn forged_post(c: &Client, path: &str, csrf: Option<&str>) -> u64 {
    let body = match csrf {
        Some(t) => format!("csrf={t}"),
        None => String::new(),
    };
    let status = c
        .execute_async(
            "const [path, body, done] = arguments;
             fetch(path, {method: 'POST', headers: {'content-type': 'application/x-www-form-urlencoded'}, body})
               .then(r => done(r.status)).catch(e => done(String(e)));",
            vec![json!(path), json!(body)],
        )
        .await
        .unwrap();
    status
        .as_u64()
        .unwrap_or_else(|| panic!("fetch failed: {status}"))
}

/// Waits until the browser is on a URL containing `part` (a navigation done).
async fn wait_for_url(c: &Client, part: &str) {
    for _ in 0..100 {
        if c.current_url().await.unwrap().as_str().contains(part) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the browser never reached a URL with {part}");
}

/// Whether the page fits the window's width (tables scroll inside their own box).
async fn fits(c: &Client) -> bool {
    c.execute(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1;",
        vec![],
    )
    .await
    .unwrap()
    .as_bool()
    .unwrap()
}

#[tokio::test]
async fn the_console_in_chromium() {
    let otto = reflex::api::auth::hash_password("otto-br0wser-pw").unwrap();
    let vera = reflex::api::auth::hash_password("vera-br0wser-pw").unwrap();
    let recv = Receiver::start().await;
    recv.status.store(500, Ordering::SeqCst);
    let mut r = Reflex::start(&format!(
        r#"
api:
  listen: 127.0.0.1:0
  token: {ADMIN_TOKEN}
  users:
    - {{name: otto, role: operator, password_hash: "{otto}"}}
    - {{name: vera, role: viewer, password_hash: "{vera}"}}
triggers:
  - name: page-storage-team
    filters: [{{exact: {{type: datastore.full}}}}]
    action: {{type: http, url: "{}"}}
    delivery: {{max_attempts: 1}}
"#,
        recv.url()
    ))
    .await;
    r.client = client_with_token(ADMIN_TOKEN);
    for (i, ds) in ["ds-gold-01", "ds-silver-02", "ds-bronze-03"]
        .iter()
        .enumerate()
    {
        let resp = r
            .client
            .post(format!("{}/api/v1/events", r.api))
            .header("content-type", "application/cloudevents+json")
            .body(
                json!({"specversion": "1.0", "id": format!("ev-browser-{i}"), "source": "/vcenter/vc-01",
                       "type": "datastore.full", "subject": ds,
                       "data": {"free_pct": 3 + i, "note": format!("capacity-alarm-{ds}")}})
                .to_string(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
    }
    let dead = r
        .wait_deliveries("state=dead&trigger=page-storage-team", 20, |l| l.len() == 3)
        .await;
    let target = dead
        .iter()
        .find(|d| d["event_id"] == "ev-browser-1")
        .unwrap()
        .clone();
    let (id, seq) = (
        target["id"].as_i64().unwrap(),
        target["event_seq"].as_i64().unwrap(),
    );

    let driver = Driver::start().await;
    let c = driver.browser().await;
    c.goto(&format!("{}/ui/overview", r.api)).await.unwrap();
    c.wait().for_element(Locator::Id("signin")).await.unwrap();
    shot(&c, "01-login").await;
    sign_in(&c, &r.api, "otto", "otto-br0wser-pw").await;
    shot(&c, "02-overview-1280").await;
    assert!(fits(&c).await);

    // Find an event by a word of its data.
    c.goto(&format!("{}/ui/events", r.api)).await.unwrap();
    c.find(Locator::Id("q"))
        .await
        .unwrap()
        .send_keys("capacity-alarm-ds-silver")
        .await
        .unwrap();
    c.find(Locator::Id("search"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for_url(&c, "q=capacity").await;
    let link = c
        .wait()
        .for_element(Locator::Css(&format!("a[href='/ui/events/{seq}']")))
        .await
        .unwrap();
    let rows = c.find_all(Locator::Css("#events tr")).await.unwrap();
    assert_eq!(rows.len(), 2, "the header and the one event that matches");
    shot(&c, "03-events-search").await;
    link.click().await.unwrap();

    // Open the dead delivery and replay it; it succeeds.
    let button = c
        .wait()
        .for_element(Locator::Css(&format!("#delivery-{id} button.replay")))
        .await
        .unwrap();
    shot(&c, "04-event-dead-delivery").await;
    recv.status.store(200, Ordering::SeqCst);
    button.click().await.unwrap();
    // htmx asks for a confirmation first.
    let mut tries = 0;
    while let Err(e) = c.accept_alert().await {
        tries += 1;
        assert!(tries < 100, "no confirmation dialog: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let flash = c
        .wait()
        .for_element(Locator::Css(".flash.ok"))
        .await
        .unwrap();
    assert!(flash
        .text()
        .await
        .unwrap()
        .contains(&format!("Delivery {id} replayed")));
    r.wait_deliveries("state=succeeded&trigger=page-storage-team", 20, |l| {
        l.len() == 1
    })
    .await;
    c.goto(&format!("{}/ui/events/{seq}", r.api)).await.unwrap();
    let state = c
        .wait()
        .for_element(Locator::Css(&format!("#delivery-{id} .state")))
        .await
        .unwrap();
    assert_eq!(state.text().await.unwrap(), "succeeded");
    assert!(c
        .find_all(Locator::Css(&format!("#delivery-{id} button.replay")))
        .await
        .unwrap()
        .is_empty());
    shot(&c, "05-event-replayed").await;

    // A change without the session's CSRF token is refused, even from the page itself.
    let other = dead.iter().find(|d| d["id"] != id).unwrap()["id"]
        .as_i64()
        .unwrap();
    assert_eq!(
        forged_post(&c, &format!("/ui/deliveries/{other}/replay"), None).await,
        403
    );
    assert_eq!(
        forged_post(
            &c,
            &format!("/ui/deliveries/{other}/replay"),
            Some("forged")
        )
        .await,
        403
    );

    // The deliveries page follows changes without a reload: another dead delivery,
    // replayed through the API, shows as succeeded within a poll or two.
    let third = dead
        .iter()
        .find(|d| d["id"] != id && d["id"] != other)
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    c.goto(&format!(
        "{}/ui/deliveries?trigger=page-storage-team",
        r.api
    ))
    .await
    .unwrap();
    let row = format!("#delivery-{third} .state");
    let state = c.wait().for_element(Locator::Css(&row)).await.unwrap();
    assert_eq!(state.text().await.unwrap(), "dead");
    let resp = r
        .client
        .post(format!("{}/api/v1/deliveries/{third}/replay", r.api))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let mut live = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Ok(e) = c.find(Locator::Css(&row)).await {
            if e.text().await.unwrap_or_default() == "succeeded" {
                live = true;
                break;
            }
        }
    }
    assert!(live, "the deliveries page did not update by itself");
    assert!(c
        .current_url()
        .await
        .unwrap()
        .as_str()
        .contains("trigger=page-storage-team"));

    // The other pages, at 1280 px and at 390 px.
    for (name, path) in [
        ("deliveries", "/ui/deliveries?state=dead".to_string()),
        ("triggers", "/ui/triggers".to_string()),
        ("approvals", "/ui/approvals".to_string()),
        ("audit", "/ui/audit".to_string()),
    ] {
        c.goto(&format!("{}{path}", r.api)).await.unwrap();
        c.wait().for_element(Locator::Css("main h1")).await.unwrap();
        shot(&c, &format!("06-{name}-1280")).await;
        assert!(fits(&c).await, "{name} is wider than 1280 px");
    }
    c.set_window_size(390, 844).await.unwrap();
    for (name, path) in [
        ("overview", "/ui/overview".to_string()),
        ("events", "/ui/events".to_string()),
        ("event", format!("/ui/events/{seq}")),
        ("deliveries", "/ui/deliveries".to_string()),
        ("triggers", "/ui/triggers".to_string()),
        ("audit", "/ui/audit".to_string()),
    ] {
        c.goto(&format!("{}{path}", r.api)).await.unwrap();
        c.wait().for_element(Locator::Css("main h1")).await.unwrap();
        shot(&c, &format!("07-{name}-390")).await;
        assert!(fits(&c).await, "{name} is wider than 390 px");
    }
    c.set_window_size(1280, 900).await.unwrap();

    // Signing out returns to the sign-in page; the console is closed again.
    c.goto(&format!("{}/ui/overview", r.api)).await.unwrap();
    c.wait()
        .for_element(Locator::Id("logout"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait().for_element(Locator::Id("signin")).await.unwrap();
    c.goto(&format!("{}/ui/triggers", r.api)).await.unwrap();
    c.wait().for_element(Locator::Id("signin")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/ui/login"));
    shot(&c, "08-signed-out").await;

    // A viewer sees no replay button, and their forged POST (with their own CSRF token)
    // is refused for the role.
    sign_in(&c, &r.api, "vera", "vera-br0wser-pw").await;
    c.goto(&format!("{}/ui/deliveries?state=dead", r.api))
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::Id("deliveries"))
        .await
        .unwrap();
    assert!(c
        .find_all(Locator::Css("button.replay"))
        .await
        .unwrap()
        .is_empty());
    shot(&c, "09-viewer-deliveries").await;
    let token = c
        .find(Locator::Css("input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        forged_post(&c, &format!("/ui/deliveries/{other}/replay"), Some(&token)).await,
        403
    );
    let still = r.api_get(&format!("/api/v1/deliveries/{other}")).await;
    assert_eq!(still["state"], "dead", "{still}");
    c.close().await.unwrap();
    r.stop().await;
}
