//! Issue 8's figures (`reflex-bench amqp SECONDS [POSTGRES_ADMIN_URL]`), measured in one run
//! against the same broker (RabbitMQ on 127.0.0.1:5672, guest):
//! (k) the ceiling: a lapin client publishing 1 KB persistent messages with publisher
//!     confirms (up to 256 unconfirmed) to a quorum queue while consuming them with acks
//!     (prefetch 256) — RabbitMQ's own confirmed publish + consume rate for that size;
//! (l) reflex with `bus: amqp` on the PostgreSQL store: 64 senders post 1 KB webhook bodies,
//!     each event goes through the exchange and a trigger's quorum queue to an `http` action
//!     on a no-op receiver; events/s acknowledged, events/s delivered end to end, and the
//!     end-to-end latency p50/p99 (sent → received by the receiver) at 500 events/s, paced.

use anyhow::{Context, Result};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const SIZE: usize = 1024;
/// Events/s of the paced phase that reads the end-to-end latency.
const RATE: u64 = 500;

fn micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// (k): confirmed publish + acked consume of 1 KB persistent messages, messages/s.
async fn ceiling(secs: u64) -> Result<f64> {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .context("RabbitMQ on 127.0.0.1:5672")?;
    let queue = format!("reflex-bench-ceiling-{}", std::process::id());
    let publ = conn.create_channel().await?;
    publ.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    publ.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    let cons = conn.create_channel().await?;
    cons.basic_qos(256, BasicQosOptions::default()).await?;
    let mut consumer = cons
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let c2 = consumed.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let _ = d.ack(BasicAckOptions::default()).await;
            c2.fetch_add(1, Ordering::Relaxed);
        }
    });
    let body = vec![b'x'; SIZE];
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut pending = VecDeque::new();
    let mut published = 0u64;
    while Instant::now() < deadline {
        let c = publ
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        pending.push_back(c);
        published += 1;
        if pending.len() >= 256 {
            pending.pop_front().expect("some").await?;
        }
    }
    for c in pending {
        c.await?;
    }
    while consumed.load(Ordering::Relaxed) < published {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = published as f64 / start.elapsed().as_secs_f64();
    reader.abort();
    let _ = publ
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    Ok(rate)
}

/// A receiver that records each event's end-to-end latency (µs) from `sent_us` in its data.
async fn receiver() -> Result<(String, Arc<Mutex<Vec<u64>>>)> {
    let lat: Arc<Mutex<Vec<u64>>> = Arc::default();
    let l2 = lat.clone();
    let app = axum::Router::new().fallback(axum::routing::post(move |body: axum::body::Bytes| {
        let lat = l2.clone();
        async move {
            let now = micros();
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                if let Some(sent) = v["sent_us"].as_u64() {
                    lat.lock().unwrap().push(now.saturating_sub(sent));
                }
            }
            "ok"
        }
    }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/fn", l.local_addr()?);
    tokio::spawn(async move { axum::serve(l, app).await });
    Ok((url, lat))
}

/// (l): reflex with `bus: amqp`.
async fn reflex_on_the_bus(
    bin: &Path,
    admin: &str,
    secs: u64,
) -> Result<(f64, f64, u64, u64, u64)> {
    let db = crate::postgres::Db::create(admin, "amqp").await?;
    let dir = std::env::temp_dir().join(format!("reflex-bench-amqp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (url, lat) = receiver().await?;
    let prefix = format!("bench{}", std::process::id());
    let body = format!(
        "bus: {{type: amqp, url: \"{URL}\", exchange: {prefix}.events, prefix: {prefix}}}\n{}triggers:\n  - name: fn\n    filters: [{{exact: {{type: alert.bench}}}}]\n    action: {{type: http, url: \"{url}\"}}\n    delivery: {{concurrency: 64}}\n",
        crate::postgres::HOOK
    );
    let node = crate::postgres::start_node(bin, &dir, "amqp-a", &db.url, "15s", &body).await?;
    let acked = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..64 {
        let (acked, hook) = (acked.clone(), node.hook.clone());
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            let pad = "x".repeat(SIZE - 120);
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let b = format!(
                    "{{\"alert\":\"bench\",\"vm\":\"vm-{w}\",\"id\":\"{w}-{i}\",\"sent_us\":{},\"pad\":\"{pad}\"}}",
                    micros()
                );
                if let Ok(r) = c
                    .post(&hook)
                    .header("content-type", "application/json")
                    .body(b)
                    .send()
                    .await
                {
                    if r.status() == 202 {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let sent_for = start.elapsed().as_secs_f64();
    let n = acked.load(Ordering::Relaxed);
    let wait_until = Instant::now() + Duration::from_secs(120);
    while (lat.lock().unwrap().len() as u64) < n && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_in = start.elapsed().as_secs_f64();
    let delivered = lat.lock().unwrap().len() as u64;
    // Latency is read at a rate the pipeline keeps up with (a closed loop only measures
    // its queue): RATE events/s for `secs`, paced.
    lat.lock().unwrap().clear();
    let paced = (RATE * secs) as usize;
    let c = reqwest::Client::new();
    let pad = "x".repeat(SIZE - 120);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let mut sends = Vec::with_capacity(paced);
    for i in 0..paced {
        tick.tick().await;
        let b = format!(
            "{{\"alert\":\"bench\",\"vm\":\"vm-p\",\"id\":\"p-{i}\",\"sent_us\":{},\"pad\":\"{pad}\"}}",
            micros()
        );
        let req = c
            .post(&node.hook)
            .header("content-type", "application/json")
            .body(b)
            .send();
        sends.push(tokio::spawn(req));
    }
    let mut paced_acked = 0usize;
    for s in sends {
        if matches!(s.await, Ok(Ok(r)) if r.status() == 202) {
            paced_acked += 1;
        }
    }
    let wait_until = Instant::now() + Duration::from_secs(60);
    while lat.lock().unwrap().len() < paced_acked && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut l = lat.lock().unwrap().clone();
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    drop(node);
    db.drop_db().await;
    Ok((
        n as f64 / sent_for,
        delivered as f64 / all_in,
        pct(0.5),
        pct(0.99),
        n - delivered.min(n),
    ))
}

/// Both figures, as a Markdown section for bench/RESULTS.md.
pub async fn run(bin: &Path, admin: &str, secs: u64) -> Result<String> {
    let ceiling = ceiling(secs).await?;
    let (ingest, delivered, p50, p99, missing) = reflex_on_the_bus(bin, admin, secs).await?;
    Ok(format!(
        "| (k) RabbitMQ ceiling: 1 KB persistent, confirmed publish + acked consume (lapin, quorum queue) | {ceiling:.0} msg/s | 1.00 |\n\
         | (l) reflex `bus: amqp` (PostgreSQL store), acknowledged by the webhook | {ingest:.0} events/s | {:.2} |\n\
         | (l) reflex `bus: amqp`, delivered end to end ({missing} acknowledged events not delivered) | {delivered:.0} events/s | {:.2} |\n\
         | (l) end-to-end latency at {RATE} events/s (paced), sent → received by the action's target | p50 {:.1} ms, p99 {:.1} ms | |\n",
        ingest / ceiling,
        delivered / ceiling,
        p50 as f64 / 1000.0,
        p99 as f64 / 1000.0
    ))
}
