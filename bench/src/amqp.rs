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

/// CPU spent in a phase (ms, 100 % of one core for one second = 1000), per process group.
#[derive(Default, Clone, Copy)]
struct Cpu {
    reflex: f64,
    postgres: f64,
    rabbitmq: f64,
    /// This process: the load generator and the receiver, or the ceiling's lapin client.
    bench: f64,
    /// The whole machine's busy and idle time over the phase (all cores).
    busy: f64,
    idle: f64,
}

impl Cpu {
    fn now(reflex: Option<u32>) -> Cpu {
        let (busy, idle) = crate::cpu::machine_ms();
        Cpu {
            reflex: reflex.map_or(0.0, crate::cpu::of_pid),
            postgres: crate::cpu::of_comm("postgres"),
            rabbitmq: crate::cpu::of_comm("beam.smp"),
            bench: crate::cpu::of_pid(std::process::id()),
            busy,
            idle,
        }
    }

    fn since(self, reflex: Option<u32>) -> Cpu {
        let n = Cpu::now(reflex);
        Cpu {
            reflex: n.reflex - self.reflex,
            postgres: n.postgres - self.postgres,
            rabbitmq: n.rabbitmq - self.rabbitmq,
            bench: n.bench - self.bench,
            busy: n.busy - self.busy,
            idle: n.idle - self.idle,
        }
    }

    /// Milliseconds of CPU per message of each part, and of the machine.
    fn per(self, messages: u64) -> Cpu {
        let m = messages.max(1) as f64;
        Cpu {
            reflex: self.reflex / m,
            postgres: self.postgres / m,
            rabbitmq: self.rabbitmq / m,
            bench: self.bench / m,
            busy: self.busy / m,
            idle: self.idle / m,
        }
    }
}

/// (k): confirmed publish + acked consume of 1 KB persistent messages: messages/s, and
/// the CPU per message.
async fn ceiling(secs: u64) -> Result<(f64, Cpu)> {
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
    let cpu = Cpu::now(None);
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
    let cpu = cpu.since(None).per(published);
    reader.abort();
    let _ = publ
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    Ok((rate, cpu))
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

/// Deletes what the run declared on the broker: every quorum queue left behind costs
/// RabbitMQ a process of its own in every later run.
async fn remove_topology(prefix: &str) {
    let Ok(conn) = Connection::connect(URL, ConnectionProperties::default()).await else {
        return;
    };
    let mut queues = vec![format!("{prefix}.trigger.fn"), format!("{prefix}.dead")];
    queues.extend(
        reflex::bus::amqp::DELAY_STEPS
            .iter()
            .map(|ms| format!("{prefix}.delay.fn.{ms}")),
    );
    // A channel each: one the broker closes over a queue that was never made
    // stops nothing else.
    for q in queues {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let _ = ch
        .exchange_delete(
            format!("{prefix}.events").as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = conn.close(0, "done".into()).await;
}

/// (l): reflex with `bus: amqp`.
async fn reflex_on_the_bus(
    bin: &Path,
    admin: &str,
    secs: u64,
) -> Result<(f64, f64, u64, u64, u64, Cpu)> {
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
    let cpu = Cpu::now(Some(node.pid()));
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
    let cpu = cpu.since(Some(node.pid())).per(delivered);
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
    remove_topology(&prefix).await;
    Ok((
        n as f64 / sent_for,
        delivered as f64 / all_in,
        pct(0.5),
        pct(0.99),
        n - delivered.min(n),
        cpu,
    ))
}

/// Both figures, as a Markdown section for bench/RESULTS.md.
pub async fn run(bin: &Path, admin: &str, secs: u64) -> Result<String> {
    let (ceiling, k) = ceiling(secs).await?;
    let (ingest, delivered, p50, p99, missing, l) = reflex_on_the_bus(bin, admin, secs).await?;
    // What 0.6 × the ceiling would cost the machine at (l)'s CPU per event, against the
    // cores there are: above 1, the target needs less CPU per event, not less waiting.
    let cores = (k.busy + k.idle) / (1000.0 / ceiling);
    let needed = 0.6 * ceiling * l.busy / 1000.0;
    let cpu = format!(
        "\nCPU per message in the same run (ms; from `/proc`, user + system; 1000 ms = one core for one second; {cores:.1} cores):\n\n\
         | phase | reflex | PostgreSQL | RabbitMQ | bench process (load + receiver, or the ceiling's client) | whole machine busy | idle |\n\
         |---|---|---|---|---|---|---|\n\
         | (k) ceiling, per message | — | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n\
         | (l) closed loop until all delivered, per event delivered | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n\n\
         At (l)'s CPU per event, 0.6 × the ceiling ({:.0} events/s) would need {needed:.2} cores of the {cores:.1}.\n",
        k.postgres, k.rabbitmq, k.bench, k.busy, k.idle,
        l.reflex, l.postgres, l.rabbitmq, l.bench, l.busy, l.idle,
        0.6 * ceiling,
    );
    Ok(format!(
        "| (k) RabbitMQ ceiling: 1 KB persistent, confirmed publish + acked consume (lapin, quorum queue) | {ceiling:.0} msg/s | 1.00 |\n\
         | (l) reflex `bus: amqp` (PostgreSQL store), acknowledged by the webhook | {ingest:.0} events/s | {:.2} |\n\
         | (l) reflex `bus: amqp`, delivered end to end ({missing} acknowledged events not delivered) | {delivered:.0} events/s | {:.2} |\n\
         | (l) end-to-end latency at {RATE} events/s (paced), sent → received by the action's target | p50 {:.1} ms, p99 {:.1} ms | |\n",
        ingest / ceiling,
        delivered / ceiling,
        p50 as f64 / 1000.0,
        p99 as f64 / 1000.0
    ) + &cpu)
}
