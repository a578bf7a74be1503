//! Test harness: an in-process reflex on port-0 listeners and a real HTTP receiver.

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::any;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    /// The CloudEvent id (`ce-id` header) of a binary-mode delivery.
    pub fn id(&self) -> String {
        self.headers["ce-id"].to_str().unwrap().to_string()
    }
}

/// A port-0 HTTP server that records requests and answers with a switchable status.
pub struct Receiver {
    pub addr: SocketAddr,
    pub rx: mpsc::UnboundedReceiver<Received>,
    pub status: Arc<AtomicU16>,
    pub delay_ms: Arc<AtomicU64>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::start_with_reply(None).await
    }

    /// `reply`: a (headers, body) answer for every request.
    pub async fn start_with_reply(
        reply: Option<(Vec<(&'static str, String)>, String)>,
    ) -> Receiver {
        let (tx, rx) = mpsc::unbounded_channel();
        let status = Arc::new(AtomicU16::new(200));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (s, d) = (status.clone(), delay_ms.clone());
        let reply = Arc::new(reply);
        let app = axum::Router::new().fallback(any(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            let s = s.clone();
            let d = d.clone();
            let reply = reply.clone();
            async move {
                let delay = d.load(Ordering::SeqCst);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                let _ = tx.send(Received { headers, body });
                let code = StatusCode::from_u16(s.load(Ordering::SeqCst)).unwrap();
                let mut resp = axum::response::Response::builder().status(code);
                let mut body = String::new();
                if let Some((h, b)) = reply.as_ref() {
                    for (k, v) in h {
                        resp = resp.header(*k, v);
                    }
                    body = b.clone();
                }
                resp.body(axum::body::Body::from(body)).unwrap()
            }
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            addr,
            rx,
            status,
            delay_ms,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/fn", self.addr)
    }

    /// Waits for the next request, failing the test after `secs`.
    pub async fn next(&mut self, secs: u64) -> Received {
        tokio::time::timeout(Duration::from_secs(secs), self.rx.recv())
            .await
            .expect("the receiver got no request in time")
            .expect("receiver closed")
    }

    /// Asserts nothing arrives within `ms`.
    pub async fn nothing_for(&mut self, ms: u64) {
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(ms), self.rx.recv()).await {
            panic!("unexpected request: {:?}", String::from_utf8_lossy(&r.body));
        }
    }
}

/// A reflex running in this process.
pub struct Reflex {
    pub http: String,
    pub api: String,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub client: reqwest::Client,
    pub dir: Arc<tempfile::TempDir>,
}

impl Reflex {
    /// Starts reflex with `yaml` (the store goes to a fresh temp dir unless `store.path` is set).
    pub async fn start(yaml: &str) -> Reflex {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        Self::start_in(yaml, dir).await
    }

    pub async fn start_in(yaml: &str, dir: Arc<tempfile::TempDir>) -> Reflex {
        // On PostgreSQL the test's database stands in for the file in its directory.
        let yaml = match pg_admin_url() {
            Some(_) => yaml.replace(
                "path: $DIR/reflex.db",
                &format!("url: \"{}\", pool_size: 4", pg_url_for(dir.path())),
            ),
            None => yaml.to_string(),
        };
        let yaml = yaml.replace("$DIR", dir.path().to_str().unwrap());
        let yaml = if yaml.contains("store:") {
            yaml
        } else {
            format!("store: {}\n{yaml}", store_config(dir.path()))
        };
        let yaml = match (amqp_bus_for(dir.path()), yaml.contains("\nbus:")) {
            (Some(bus), false) => format!("{yaml}\nbus: {bus}\n"),
            _ => yaml,
        };
        let cfg = reflex::config::parse("test.yaml", &yaml).unwrap_or_else(|e| panic!("{e}"));
        let compiled = reflex::compile("test.yaml".into(), cfg).unwrap_or_else(|e| panic!("{e}"));
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (ha, aa) = (http.local_addr().unwrap(), api.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(reflex::run(
            compiled,
            reflex::Listeners { http, api },
            shutdown.clone(),
        ));
        let r = Reflex {
            http: format!("http://{ha}"),
            api: format!("http://{aa}"),
            shutdown,
            task,
            client: reqwest::Client::new(),
            dir,
        };
        r.wait_ready().await;
        r
    }

    /// Waits for `/readyz` (up to 30 s: on the RabbitMQ bus a start declares quorum queues,
    /// which a broker busy with the rest of the suite can take seconds to do).
    pub async fn wait_ready(&self) {
        for _ in 0..1500 {
            if let Ok(r) = self.client.get(format!("{}/readyz", self.api)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("reflex did not become ready");
    }

    pub async fn stop(self) -> Arc<tempfile::TempDir> {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        self.dir
    }

    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.http))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn api_get(&self, path: &str) -> serde_json::Value {
        self.client
            .get(format!("{}{path}", self.api))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls the deliveries API until `pred` holds for the list, or fails after `secs`.
    pub async fn wait_deliveries(
        &self,
        query: &str,
        secs: u64,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self
                .api_get(&format!("/api/v1/deliveries?limit=1000&{query}"))
                .await;
            let list = v["deliveries"].as_array().cloned().unwrap_or_default();
            if pred(&list) {
                return list;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("condition not reached; deliveries: {list:#?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Asserts `/metrics` counts a decision of guard rail `guard` (any trigger).
    pub async fn assert_guard_rail(&self, guard: &str, decision: &str) {
        let m = self.metrics().await;
        let want = format!("guard=\"{guard}\",decision=\"{decision}\"");
        assert!(
            m.lines()
                .any(|l| l.starts_with("reflex_guard_rail_decisions_total{") && l.contains(&want)),
            "no {guard}/{decision} guard-rail decision in the metrics:\n{m}"
        );
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.api))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A structured CloudEvent as JSON text.
pub fn cloudevent(id: &str, ty: &str, data: serde_json::Value) -> String {
    serde_json::json!({"specversion": "1.0", "id": id, "source": "/test", "type": ty, "datacontenttype": "application/json", "data": data}).to_string()
}

/// POSTs a structured CloudEvent.
pub async fn post_ce(r: &Reflex, path: &str, body: String) -> reqwest::Response {
    r.client
        .post(format!("{}{path}", r.http))
        .header("content-type", "application/cloudevents+json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// POSTs `n` CloudEvents of type `ty` with empty data, ids `PREFIX-0`, `PREFIX-1`…
pub async fn post_many(r: &Reflex, prefix: &str, ty: &str, n: usize) {
    for i in 0..n {
        let ev = cloudevent(&format!("{prefix}-{i}"), ty, serde_json::json!({}));
        assert_eq!(post_ce(r, "/events", ev).await.status(), 202);
    }
}

/// The PostgreSQL server the suite runs against when `REFLEX_TEST_STORE=postgres`
/// (`REFLEX_TEST_PG`, default `postgres://postgres@127.0.0.1:5432/postgres`), or `None`
/// for the embedded default. The same tests run on either backend.
pub fn pg_admin_url() -> Option<String> {
    match std::env::var("REFLEX_TEST_STORE").as_deref() {
        Ok("postgres") => Some(
            std::env::var("REFLEX_TEST_PG")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        ),
        Ok("sqlite") | Ok("") | Err(_) => None,
        Ok(other) => panic!("REFLEX_TEST_STORE={other}: expected sqlite or postgres"),
    }
}

/// Whether the suite runs with `REFLEX_TEST_BUS=amqp`.
pub fn on_amqp_bus() -> bool {
    std::env::var("REFLEX_TEST_BUS").as_deref() == Ok("amqp")
}

/// With `REFLEX_TEST_BUS=amqp` (and the PostgreSQL store), the `bus:` mapping that puts a
/// test's deliveries on RabbitMQ (`REFLEX_TEST_AMQP`), with an exchange and queues of its
/// own; `None` for the embedded bus.
pub fn amqp_bus_for(dir: &std::path::Path) -> Option<String> {
    match std::env::var("REFLEX_TEST_BUS").as_deref() {
        Ok("amqp") => {}
        Ok("embedded") | Ok("") | Err(_) => return None,
        Ok(other) => panic!("REFLEX_TEST_BUS={other}: expected embedded or amqp"),
    }
    assert!(
        pg_admin_url().is_some(),
        "REFLEX_TEST_BUS=amqp needs REFLEX_TEST_STORE=postgres (the AMQP bus shares a store)"
    );
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    let name = format!("reflex_t_{:016x}", h.finish());
    let url = std::env::var("REFLEX_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    Some(format!(
        "{{type: amqp, url: \"{url}\", exchange: {name}.events, prefix: {name}}}"
    ))
}

/// A database of its own for the store kept in `dir` (the same `dir` gives the same
/// database, so restarts find their data), created on first use.
pub fn pg_url_for(dir: &std::path::Path) -> String {
    use std::hash::{Hash, Hasher};
    let admin = pg_admin_url().expect("REFLEX_TEST_STORE=postgres");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    let name = format!("reflex_t_{:016x}", h.finish());
    let admin2 = admin.clone();
    let name2 = name.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&admin2, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL at {admin2}: {e}"));
            tokio::spawn(conn);
            let exists = client
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name2])
                .await
                .unwrap()
                .is_some();
            if !exists {
                client
                    .batch_execute(&format!("CREATE DATABASE {name2}"))
                    .await
                    .unwrap();
            }
        })
    })
    .join()
    .unwrap();
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

/// The `store:` mapping for a store kept in `dir`, on the backend the suite runs on.
pub fn store_config(dir: &std::path::Path) -> String {
    match pg_admin_url() {
        // Few connections each: the suite runs many nodes at once on one server.
        Some(_) => format!("{{url: \"{}\", pool_size: 4}}", pg_url_for(dir)),
        None => format!("{{path: \"{}/reflex.db\"}}", dir.display()),
    }
}

/// Opens the store of `dir` (after reflex stopped), on the backend the suite runs on.
pub async fn open_backend(dir: &std::path::Path) -> reflex::store::Backend {
    let yaml = format!("store: {}\n", store_config(dir));
    let mut cfg = reflex::config::parse("store.yaml", &yaml).unwrap();
    cfg.store.node = Some("test-reader".into());
    reflex::store::Backend::open(&cfg.store, "127.0.0.1:1".parse().unwrap())
        .await
        .unwrap()
}

/// A self-signed certificate for `localhost` and 127.0.0.1, made by openssl in `dir`:
/// (certificate, key), both PEM.
pub fn localhost_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "keyUsage=digitalSignature",
            "-addext",
            "extendedKeyUsage=serverAuth",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(out.status.success(), "{out:?}");
    (cert, key)
}

/// [`localhost_cert`] and a TLS acceptor serving it: (certificate path, acceptor).
pub fn tls_for_localhost(dir: &std::path::Path) -> (std::path::PathBuf, tokio_rustls::TlsAcceptor) {
    let (cert, key) = localhost_cert(dir);
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key_der = rustls_pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .unwrap();
    (
        cert,
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
    )
}

/// An `application/x-www-form-urlencoded` body, as a browser's form sends it.
pub fn form_body(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// A client that sends `token` as a bearer on every request (for a server whose API needs
/// authentication).
pub fn client_with_token(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// The CSRF token a console page's forms carry.
pub fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    page[at..].split('"').next().unwrap().to_string()
}
