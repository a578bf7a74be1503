//! Benchmarks of the PostgreSQL store (`reflex-bench postgres`), each next to a reference
//! measured in the same run against the same server:
//! (h) durable ingest into the PostgreSQL store vs a plain client doing batched
//!     `INSERT … VALUES (…),(…); COMMIT` of rows of the same size;
//! (i) the whole pipeline (webhook → store → trigger → http action) on two nodes vs one;
//! (j) failover of a singleton source (a vCenter poller) when its node is SIGKILLed, vs the
//!     lease time.

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

/// A database of its own for one measurement, dropped when done.
pub(crate) struct Db {
    admin: String,
    name: String,
    pub(crate) url: String,
}

impl Db {
    pub(crate) async fn create(admin: &str, tag: &str) -> Result<Db> {
        let name = format!("reflex_bench_{}_{tag}", std::process::id());
        let (c, conn) = tokio_postgres::connect(admin, NoTls)
            .await
            .with_context(|| {
                format!("connecting to {admin} (--postgres: a role that may create databases)")
            })?;
        tokio::spawn(conn);
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .await?;
        c.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        let url = with_dbname(admin, &name);
        Ok(Db {
            admin: admin.to_string(),
            name,
            url,
        })
    }

    async fn client(&self) -> Result<tokio_postgres::Client> {
        let (c, conn) = tokio_postgres::connect(&self.url, NoTls).await?;
        tokio::spawn(conn);
        Ok(c)
    }

    pub(crate) async fn drop_db(self) {
        if let Ok((c, conn)) = tokio_postgres::connect(&self.admin, NoTls).await {
            tokio::spawn(conn);
            let _ = c
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await;
        }
    }
}

/// The admin URL with its database replaced by `db`.
fn with_dbname(admin: &str, db: &str) -> String {
    let (base, query) = match admin.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (admin, String::new()),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

fn node_config(
    dir: &Path,
    name: &str,
    url: &str,
    http: u16,
    api: u16,
    lease: &str,
    body: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "http: {{listen: \"127.0.0.1:{http}\", queue: 100000}}\napi: {{listen: \"127.0.0.1:{api}\"}}\nlog: {{level: warn}}\nstore: {{url: \"{url}\", node: {name}, lease: {lease}}}\n{body}"
        ),
    )
    .unwrap();
    path
}

pub(crate) const HOOK: &str = "sources:\n  - name: hook\n    type: webhook\n    path: /hook\n    mapping: {type: \"alert.{{ body.alert }}\", subject: \"{{ body.vm }}\", id: \"{{ body.id }}\"}\n";

/// A started node: its process and its URLs.
pub(crate) struct Node {
    proc: crate::Proc,
    pub(crate) hook: String,
    api: String,
}

impl Node {
    /// The node's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

pub(crate) async fn start_node(
    bin: &Path,
    dir: &Path,
    name: &str,
    url: &str,
    lease: &str,
    body: &str,
) -> Result<Node> {
    let (http, api) = (crate::free_port(), crate::free_port());
    let cfg = node_config(dir, name, url, http, api, lease, body);
    let proc = crate::spawn_reflex(bin, &cfg)?;
    let api = format!("http://127.0.0.1:{api}");
    crate::wait_up(&format!("{api}/readyz")).await?;
    Ok(Node {
        proc,
        hook: format!("http://127.0.0.1:{http}/hook"),
        api,
    })
}

/// The reference for (h): `conns` connections, each committing batches of `batch` rows of
/// `row` bytes of body into a table shaped like reflex's events table, for `secs` seconds.
async fn plain_inserts(db: &Db, conns: usize, batch: usize, row: usize, secs: u64) -> Result<f64> {
    let c = db.client().await?;
    c.batch_execute(
        "CREATE TABLE plain_events (seq BIGSERIAL PRIMARY KEY, source_name TEXT NOT NULL, \
         ce_source TEXT NOT NULL, ce_id TEXT NOT NULL, type TEXT NOT NULL, subject TEXT, \
         received_at BIGINT NOT NULL, body TEXT NOT NULL)",
    )
    .await?;
    let body = "x".repeat(row);
    let rows = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conns {
        let c = db.client().await?;
        let (rows, body) = (rows.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                // One multi-row INSERT with literal values, as a plain client writes it.
                let mut sql = String::from(
                    "BEGIN; INSERT INTO plain_events (source_name, ce_source, ce_id, type, subject, received_at, body) VALUES ",
                );
                for k in 0..batch {
                    i += 1;
                    if k > 0 {
                        sql.push(',');
                    }
                    sql.push_str(&format!(
                        "('hook','/hook','{w}-{i}','alert.bench','vm-{w}',{i},'{body}')"
                    ));
                }
                sql.push_str("; COMMIT;");
                c.batch_execute(&sql).await?;
                rows.fetch_add(batch as u64, Ordering::Relaxed);
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(rows.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// (h) without HTTP: `conc` tasks each handing one event at a time to the PostgreSQL
/// store's ingest (as the webhook handlers do), so the store's batching and SQL are
/// measured alone. Bodies of `row` bytes.
async fn store_ingest(db: &Db, conc: usize, row: usize, secs: u64) -> Result<f64> {
    use reflex::store::NewEvent;
    let cfg = reflex::config::parse(
        "bench.yaml",
        &format!("store: {{url: \"{}\", node: bench}}\n", db.url),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let backend = reflex::store::Backend::open(&cfg.store, "127.0.0.1:1".parse()?).await?;
    let store = backend.store.clone();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conc {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let id = format!("{w}-{n}");
                let mut body = format!(
                    "{{\"specversion\":\"1.0\",\"id\":\"{id}\",\"source\":\"/hook\",\"type\":\"alert.bench\",\"subject\":\"vm-{w}\",\"data\":{{\"pad\":\""
                );
                while body.len() + 3 < row {
                    body.push('x');
                }
                body.push_str("\"}}");
                let event = NewEvent {
                    source_name: "hook".into(),
                    ce_source: "/hook".into(),
                    ce_id: id,
                    ty: "alert.bench".into(),
                    subject: Some(format!("vm-{w}")),
                    body,
                    deliveries: Vec::new(),
                };
                store.ingest(vec![event]).await?;
            }
            Ok::<u64, reflex::store::StoreError>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let eps = total as f64 / start.elapsed().as_secs_f64();
    store.flush().await;
    drop(backend);
    Ok(eps)
}

/// Receives http actions and counts deliveries by event id.
async fn receiver() -> Result<(u16, Arc<Mutex<HashMap<String, u32>>>)> {
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let port = crate::free_port();
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap, body: Bytes| {
        let s = s.clone();
        async move {
            // The webhook events carry their id in the body; a CloudEvent in binary mode
            // (the vCenter's) in `ce-id`.
            let id = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_string))
                .or_else(|| {
                    headers
                        .get("ce-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                });
            if let Some(id) = id {
                *s.lock().unwrap().entry(id).or_default() += 1;
            }
            "ok"
        }
    });
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tokio::spawn(async move { axum::serve(l, app).await });
    Ok((port, seen))
}

/// Closed-loop load spread over `urls`; returns the ids answered 202 and the count of others.
async fn load(urls: &[String], concurrency: usize, secs: u64, tag: &str) -> (Vec<String>, u64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let bad = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let url = urls[w % urls.len()].clone();
        let (client, bad, tag) = (client.clone(), bad.clone(), tag.to_string());
        tasks.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let id = format!("{tag}-{w}-{i}");
                let body = format!("{{\"alert\":\"bench\",\"vm\":\"vm-{w}\",\"id\":\"{id}\"}}");
                match client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) if r.status().as_u16() == 202 => ok.push(id),
                    _ => {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            ok
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap_or_default());
    }
    (ids, bad.load(Ordering::Relaxed))
}

/// One row of (i): events/s acknowledged, events/s delivered (every 202'd one, counted by
/// id), duplicates.
struct Pipeline {
    acked: usize,
    refused: u64,
    ingest_eps: f64,
    delivered: usize,
    delivered_eps: f64,
    duplicates: u32,
}

async fn pipeline(
    bin: &Path,
    admin: &str,
    nodes: usize,
    secs: u64,
    conc: usize,
) -> Result<Pipeline> {
    let (port, seen) = receiver().await?;
    let db = Db::create(admin, &format!("n{nodes}")).await?;
    let dir = std::env::temp_dir().join(format!("reflex-bench-pg-{}-{nodes}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let body = format!(
        "{HOOK}triggers:\n  - name: fn\n    filters: [{{exact: {{type: alert.bench}}}}]\n    action: {{type: http, url: \"http://127.0.0.1:{port}/fn\"}}\n    delivery: {{concurrency: 64}}\n"
    );
    let mut running = Vec::new();
    for n in 0..nodes {
        running.push(start_node(bin, &dir, &format!("node-{n}"), &db.url, "15s", &body).await?);
    }
    let urls: Vec<String> = running.iter().map(|n| n.hook.clone()).collect();
    let start = Instant::now();
    let (ids, refused) = load(&urls, conc, secs, &format!("n{nodes}")).await;
    let ingest_eps = ids.len() as f64 / start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let got = {
            let s = seen.lock().unwrap();
            ids.iter().filter(|id| s.contains_key(*id)).count()
        };
        if got == ids.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{nodes} node(s): {got} of {} acknowledged events delivered after 300 s",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered_eps = ids.len() as f64 / start.elapsed().as_secs_f64();
    let duplicates = seen.lock().unwrap().values().map(|n| n - 1).sum();
    drop(running);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Pipeline {
        acked: ids.len(),
        refused,
        ingest_eps,
        delivered: ids.len(),
        delivered_eps,
        duplicates,
    })
}

/// (j): two nodes poll one simulator; the holder of the source's lease is SIGKILLed, a VM is
/// powered on, and the time until that event reaches the http action is measured.
async fn failover(bin: &Path, admin: &str, lease_s: u64, trials: usize) -> Result<Vec<Duration>> {
    use vsphere::vm::{PowerOp, VmSelector};
    let sim = vsphere::sim::Simulator::start();
    let c = vsphere::Client::connect(crate::vcenter::opts(&sim)).await?;
    let vm = c.find_vm(&VmSelector::Name("DC0_H0_VM1".into())).await?;
    let (port, seen) = receiver().await?;
    let mut took = Vec::new();
    for trial in 0..trials {
        let db = Db::create(admin, &format!("f{trial}")).await?;
        let dir =
            std::env::temp_dir().join(format!("reflex-bench-pgf-{}-{trial}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let body = format!(
            "vcenters:\n  vc1: {{url: \"{}\", username: user, password: pass, insecure: true}}\nsources:\n  - {{name: vc, type: vcenter, vcenter: vc1, poll_interval: 1s}}\ntriggers:\n  - name: power\n    filters: [{{prefix: {{type: com.vmware.vsphere.VmPower}}}}]\n    action: {{type: http, url: \"http://127.0.0.1:{port}/\"}}\n",
            sim.url
        );
        let lease = format!("{lease_s}s");
        let a = start_node(bin, &dir, "node-a", &db.url, &lease, &body).await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let b = start_node(bin, &dir, "node-b", &db.url, &lease, &body).await?;
        // Node A started first and holds the source: check, then kill it.
        let nodes: serde_json::Value = reqwest::get(format!("{}/api/v1/nodes", b.api))
            .await?
            .json()
            .await?;
        let holds_a = nodes["nodes"].as_array().into_iter().flatten().any(|n| {
            n["id"] == "node-a"
                && n["singletons"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|x| x == "source:vc"))
        });
        if !holds_a {
            bail!("node-a does not hold the source: {nodes}");
        }
        // Let node A's lease be renewed at least once so the kill lands mid-lease.
        tokio::time::sleep(Duration::from_millis(lease_s * 1000 / 2)).await;
        let before = seen.lock().unwrap().len();
        unsafe { libc::kill(a.proc.0.id() as i32, libc::SIGKILL) };
        let killed = Instant::now();
        c.power(
            &vm,
            if trial % 2 == 0 {
                PowerOp::Off
            } else {
                PowerOp::On
            },
        )
        .await?;
        let deadline = killed + Duration::from_secs(lease_s * 4 + 10);
        while seen.lock().unwrap().len() <= before {
            if Instant::now() > deadline {
                bail!("failover trial {trial}: the event after the kill was not delivered");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        took.push(killed.elapsed());
        drop((a, b));
        db.drop_db().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(took)
}

/// Runs (h), (i) and (j); returns the report section.
/// (h) without HTTP, next to the plain client, with 64 tasks and 240-byte bodies.
pub async fn store_only(admin: &str, secs: u64) -> Result<String> {
    let db = Db::create(admin, "plain").await?;
    let plain = plain_inserts(&db, 2, 32, 240, secs).await?;
    db.drop_db().await;
    let db = Db::create(admin, "store").await?;
    let store = store_ingest(&db, 64, 240, secs).await?;
    db.drop_db().await;
    Ok(format!(
        "store alone {store:.0} events/s, plain client {plain:.0} rows/s: {:.2}",
        store / plain
    ))
}

pub async fn run(bin: &Path, admin: &str, secs: u64, conc: usize) -> Result<String> {
    // (h) reflex first, then the plain client on a fresh database of the same server.
    eprintln!("(h) saturating reflex's webhook ingest on the PostgreSQL store for {secs}s…");
    let db = Db::create(admin, "ingest").await?;
    let dir = std::env::temp_dir().join(format!("reflex-bench-pgi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let node = start_node(bin, &dir, "node-0", &db.url, "15s", HOOK).await?;
    let start = Instant::now();
    let (ids, refused) = load(std::slice::from_ref(&node.hook), conc, secs, "h").await;
    let reflex_eps = ids.len() as f64 / start.elapsed().as_secs_f64();
    drop(node);
    let row: i64 = db
        .client()
        .await?
        .query_one(
            "SELECT COALESCE(AVG(LENGTH(body)), 0)::BIGINT FROM events",
            &[],
        )
        .await?
        .get(0);
    db.drop_db().await;
    let _ = std::fs::remove_dir_all(&dir);
    // reflex batches what its 64 connections send into two writers; the plain client gets
    // the same shape: two connections, half the in-flight requests per batch.
    let (pconns, pbatch) = (2, conc / 2);
    eprintln!(
        "(h) reference: {pconns} connections committing {pbatch}-row INSERTs of {row}-byte bodies…"
    );
    let db = Db::create(admin, "plain").await?;
    let plain_rps = plain_inserts(&db, pconns, pbatch.max(1), row as usize, secs).await?;
    db.drop_db().await;
    eprintln!("(h) the store alone: {conc} tasks handing it one event each…");
    let db = Db::create(admin, "store").await?;
    let store_eps = store_ingest(&db, conc, row as usize, secs).await?;
    db.drop_db().await;
    eprintln!("(h) store alone {store_eps:.0} events/s");

    eprintln!("(h) reflex {reflex_eps:.0} events/s, plain client {plain_rps:.0} rows/s");
    eprintln!("(i) the whole pipeline on one node, then on two…");
    let one = pipeline(bin, admin, 1, secs, conc).await?;
    eprintln!(
        "(i) one node: {:.0} acknowledged/s, {:.0} delivered/s",
        one.ingest_eps, one.delivered_eps
    );
    let two = pipeline(bin, admin, 2, secs, conc).await?;
    eprintln!(
        "(i) two nodes: {:.0} acknowledged/s, {:.0} delivered/s",
        two.ingest_eps, two.delivered_eps
    );

    eprintln!("(j) singleton failover: 3 trials at a 5 s lease…");
    let lease_s = 5;
    let took = failover(bin, admin, lease_s, 3).await?;
    let max = took.iter().max().copied().unwrap_or_default();
    let list = took
        .iter()
        .map(|d| format!("{:.1} s", d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ");

    let row_i = |p: &Pipeline| {
        format!(
            "{:.0} events/s acknowledged, {:.0} events/s delivered ({}/{} delivered, {} delivered twice, {} refused)",
            p.ingest_eps, p.delivered_eps, p.delivered, p.acked, p.duplicates, p.refused
        )
    };
    Ok(format!(
        "| (h) durable ingest into the PostgreSQL store, closed loop, {conc} connections | {reflex_eps:.0} events/s ({} acknowledged, {refused} non-202) | plain client, {pconns} connections × {pbatch}-row `INSERT …; COMMIT` of {row}-byte bodies: {plain_rps:.0} rows/s | {:.2} | ≥ 0.5 |\n\
| (h) the same, the store alone: {conc} tasks handing `Store::ingest` one event each (no HTTP) | {store_eps:.0} events/s | the same plain client: {plain_rps:.0} rows/s | {:.2} | ≥ 0.5 |\n\
| (i) whole pipeline (webhook → PostgreSQL → trigger → http action), {conc} connections for {secs} s, two nodes | {} | one node: {} | ×{:.2} delivered | — |\n\
| (j) vCenter source failover after SIGKILL of its node (event after the kill → http action), lease {lease_s} s | {list} | the lease: {lease_s} s | max ×{:.2} of the lease | ≤ 2 × lease |\n",
        ids.len(),
        reflex_eps / plain_rps,
        store_eps / plain_rps,
        row_i(&two),
        row_i(&one),
        two.delivered_eps / one.delivered_eps,
        max.as_secs_f64() / lease_s as f64,
    ))
}
