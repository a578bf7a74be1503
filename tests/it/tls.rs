//! HTTPS on the sources' listener and the API's, with certificates read again at reload.

use crate::common::*;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A client that trusts only the certificate in `pem`.
fn trusting(pem: &std::path::Path) -> reqwest::Client {
    let cert = reqwest::Certificate::from_pem(&std::fs::read(pem).unwrap()).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([cert])
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Whether `/readyz` answers 200 through `client` within `tries` × 25 ms.
async fn ready_over(client: &reqwest::Client, api_url: &str, tries: u32) -> bool {
    for _ in 0..tries {
        if let Ok(r) = client.get(format!("{api_url}/readyz")).send().await {
            if r.status() == 200 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test]
async fn both_listeners_serve_https_and_a_reload_takes_a_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    std::fs::create_dir_all(&first).unwrap();
    std::fs::create_dir_all(&second).unwrap();
    let (cert1, key1) = localhost_cert(&first);
    let (cert2, key2) = localhost_cert(&second);
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&cert1, &cert).unwrap();
    std::fs::copy(&key1, &key).unwrap();

    let mut recv = Receiver::start().await;
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (hp, ap) = (
        http.local_addr().unwrap().port(),
        api.local_addr().unwrap().port(),
    );
    let password = reflex::api::auth::hash_password("tls-pa55word").unwrap();
    let path = dir.path().join("reflex.yaml");
    std::fs::write(
        &path,
        format!(
            r#"
http:
  listen: "127.0.0.1:{hp}"
  tls: {{cert_file: "{c}", key_file: "{k}"}}
api:
  listen: "127.0.0.1:{ap}"
  tls: {{cert_file: "{c}", key_file: "{k}"}}
  users: [{{name: tess, role: admin, password_hash: "{password}"}}]
store: {store}
sources:
  - {{name: ce, type: cloudevents, path: /events}}
triggers:
  - name: fn
    action: {{type: http, url: "{url}"}}
"#,
            c = cert.display(),
            k = key.display(),
            store = store_config(dir.path()),
            url = recv.url()
        ),
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(reflex::run_with_reload(
        reflex::compile_file(&path).unwrap(),
        reflex::Listeners { http, api },
        shutdown.clone(),
        Some(reflex::Reload::new(path.clone())),
    ));
    let old = trusting(&cert1);
    let new = trusting(&cert2);
    let api_url = format!("https://127.0.0.1:{ap}");
    assert!(
        ready_over(&old, &api_url, 200).await,
        "the API never answered over HTTPS"
    );

    // An event over HTTPS is acknowledged and delivered.
    let resp = old
        .post(format!("https://127.0.0.1:{hp}/events"))
        .header("content-type", "application/cloudevents+json")
        .body(cloudevent("tls-1", "test.tls", serde_json::json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(recv.next(20).await.id(), "tls-1");

    // Plain HTTP to a TLS port gets no answer; a client that does not trust the
    // certificate refuses it.
    assert!(reqwest::Client::new()
        .get(format!("http://127.0.0.1:{ap}/readyz"))
        .send()
        .await
        .is_err());
    assert!(new.get(format!("{api_url}/readyz")).send().await.is_err());

    // Over TLS the session cookie is Secure.
    let resp = old
        .post(format!("{api_url}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[("user", "tess"), ("password", "tls-pa55word")]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("; Secure"), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_string();
    let csrf_page = old
        .get(format!("{api_url}/ui/overview"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = csrf_of(&csrf_page);

    // A broken certificate file: the reload is refused with the file named, and the
    // running certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    let resp = old
        .post(format!("{api_url}/api/v1/reload"))
        .header("cookie", &session)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    let why = body["error"]["message"].as_str().unwrap();
    assert!(
        why.contains("api.tls") && why.contains("cert_file"),
        "{why}"
    );
    assert_eq!(
        old.get(format!("{api_url}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // The renewed certificate is taken at the reload (as SIGHUP does).
    std::fs::copy(&cert2, &cert).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    let resp = old
        .post(format!("{api_url}/api/v1/reload"))
        .header("cookie", &session)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "{:?}", resp.text().await);
    assert!(
        ready_over(&new, &api_url, 400).await,
        "the renewed certificate was not served after the reload"
    );
    // Fresh connections (the old client's may be kept alive) no longer get the old one.
    assert!(trusting(&cert1)
        .get(format!("{api_url}/readyz"))
        .send()
        .await
        .is_err());
    let resp = new
        .post(format!("https://127.0.0.1:{hp}/events"))
        .header("content-type", "application/cloudevents+json")
        .body(cloudevent("tls-2", "test.tls", serde_json::json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(recv.next(20).await.id(), "tls-2");
    // The session outlived the reload (it is kept in the store).
    let who: serde_json::Value = new
        .get(format!("{api_url}/api/v1/whoami"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(who["name"], "tess", "{who}");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
