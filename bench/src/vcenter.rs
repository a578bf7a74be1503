//! vCenter source benchmarks against govmomi's simulator:
//! (d) conversion: a full history page (the simulator keeps the newest 1000 events) read,
//!     converted to CloudEvents and made durable, vs the bare SOAP read of the same page;
//! (e) lag: from `PostEvent` returning to the CloudEvent reaching an http action (the
//!     source waits on the page with `WaitForUpdatesEx`; the 1 s poll interval bounds it).

use anyhow::Result;
use axum::body::Bytes;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vsphere::sim::Simulator;
use vsphere::vm::VmSelector;

/// Connection options for the simulator's fixed user.
pub(crate) fn opts(sim: &Simulator) -> vsphere::ConnectOptions {
    vsphere::ConnectOptions {
        url: sim.url.clone(),
        username: "user".into(),
        password: "pass".into(),
        insecure: true,
        ca_pem: None,
        thumbprint: None,
        timeout: Duration::from_secs(60),
    }
}

/// A metric's value (the first line starting with `prefix`), 0 when absent.
async fn metric(api: &str, prefix: &str) -> u64 {
    let Ok(r) = reqwest::get(format!("{api}/metrics")).await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

fn config(
    dir: &std::path::Path,
    http: u16,
    api: u16,
    sim: &Simulator,
    poll: &str,
    first: &str,
    receiver: Option<u16>,
) -> std::path::PathBuf {
    let trigger = receiver
        .map(|p| format!("triggers:\n  - name: fn\n    filters: [{{exact: {{type: com.vmware.vsphere.GeneralUserEvent.v0}}}}]\n    action: {{type: http, url: \"http://127.0.0.1:{p}/\"}}\n"))
        .unwrap_or_default();
    let path = dir.join("vc.yaml");
    std::fs::write(
        &path,
        format!(
            "http: {{listen: \"127.0.0.1:{http}\"}}\napi: {{listen: \"127.0.0.1:{api}\"}}\nlog: {{level: warn}}\nstore: {{path: \"{}/vc.db\"}}\nvcenters:\n  vc1: {{url: \"{}\", username: user, password: pass, insecure: true, loop_guard: false}}\nsources:\n  - {{name: vc, type: vcenter, vcenter: vc1, poll_interval: {poll}, first_start: {first}, max_replay_age: 7d}}\n{trigger}",
            dir.display(),
            sim.url
        ),
    )
    .unwrap();
    path
}

/// Runs (d) and (e); returns the report's table rows.
pub async fn run(reflex_bin: &std::path::Path, rounds: usize, lag_events: usize) -> Result<String> {
    let sim = Simulator::start();
    let c = vsphere::Client::connect(opts(&sim)).await?;
    let vm = c.find_vm(&VmSelector::Name("DC0_H0_VM0".into())).await?;
    eprintln!("(d) filling the simulator's history (1000 events)…");
    for i in 0..1000 {
        let ev = vsphere::events::alarm_status_changed(
            &vm,
            "DC0_H0_VM0",
            &format!("bench {i}"),
            "green",
            "yellow",
        );
        c.post_event(ev).await?;
    }
    // Reference: the bare read of the page (SOAP + XML parse).
    let collector = c.create_event_collector(vsphere::events::MAX_COUNT).await?;
    let t = Instant::now();
    let mut page_len = 0;
    for _ in 0..rounds {
        page_len = c.latest_page(&collector).await?.len();
    }
    let read_per_s = (page_len * rounds) as f64 / t.elapsed().as_secs_f64();
    c.destroy_collector(&collector).await;

    // reflex: a fresh store each round. `first_start: now` measures start-up and the first
    // poll alone (nothing to convert); `history` adds converting and storing the whole page.
    let mut baseline = Duration::ZERO;
    let mut total = 0u64;
    let mut elapsed = Duration::ZERO;
    for round in 0..2 * rounds {
        let history = round % 2 == 1;
        let dir =
            std::env::temp_dir().join(format!("reflex-bench-vc-{}-{round}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let (http, api) = (crate::free_port(), crate::free_port());
        let cfg = config(
            &dir,
            http,
            api,
            &sim,
            "50ms",
            if history { "history" } else { "now" },
            None,
        );
        let api_url = format!("http://127.0.0.1:{api}");
        let start = Instant::now();
        let proc = crate::spawn_reflex(reflex_bin, &cfg)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut n = 0;
        while Instant::now() < deadline {
            if history {
                n = metric(&api_url, "reflex_events_received_total{source=\"vc\"}").await;
                if n as usize >= page_len {
                    break;
                }
            } else if metric(&api_url, "reflex_source_up{source=\"vc\"}").await == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if history {
            elapsed += start.elapsed();
            total += n;
        } else {
            baseline += start.elapsed();
        }
        drop(proc);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let convert_per_s = total as f64 / elapsed.saturating_sub(baseline).as_secs_f64();

    // (e)'s reference: how long the simulator itself takes to wake a bare watch on
    // `latestPage` after PostEvent (it gathers updates on a 250 ms ticker).
    eprintln!("(e) reference: a bare watch's wake-up over {lag_events} events…");
    let c = Arc::new(c);
    let collector = c.create_event_collector(10).await?;
    let mut watch = c.watch(&collector, &["latestPage"]).await?;
    c.wait_for_change(&mut watch, Duration::from_secs(1))
        .await?;
    let mut wakes: Vec<u64> = Vec::new();
    for i in 0..lag_events {
        // The watch is waiting when the event happens, as reflex's is.
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move {
                let woke = c.wait_for_change(&mut watch, Duration::from_secs(5)).await;
                (watch, woke, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(37 * (i as u64 % 7) + 20)).await;
        c.post_event(vsphere::events::user_event(&format!("wake probe {i}")))
            .await?;
        let posted = Instant::now();
        let (w, woke, at) = waiter.await?;
        watch = w;
        if woke? {
            wakes.push(at.saturating_duration_since(posted).as_micros() as u64);
        }
    }
    c.unwatch(watch).await;
    c.destroy_collector(&collector).await;
    let (w50, w99) = (
        crate::percentile(&mut wakes, 0.5),
        crate::percentile(&mut wakes, 0.99),
    );

    // (e) lag at poll_interval 1s.
    eprintln!("(e) lag at a 1 s poll interval over {lag_events} events…");
    let seen: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let recv_port = crate::free_port();
    {
        let seen = seen.clone();
        let app = axum::Router::new().fallback(move |body: Bytes| {
            let seen = seen.clone();
            async move {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                    if let Some(m) = v["FullFormattedMessage"].as_str() {
                        seen.lock().unwrap().push((m.to_string(), Instant::now()));
                    }
                }
                "ok"
            }
        });
        let l = tokio::net::TcpListener::bind(("127.0.0.1", recv_port)).await?;
        tokio::spawn(async move { axum::serve(l, app).await });
    }
    let dir = std::env::temp_dir().join(format!("reflex-bench-vc-lag-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (http, api) = (crate::free_port(), crate::free_port());
    let cfg = config(&dir, http, api, &sim, "1s", "now", Some(recv_port));
    let proc = crate::spawn_reflex(reflex_bin, &cfg)?;
    crate::wait_up(&format!("http://127.0.0.1:{api}/readyz")).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut sent = Vec::new();
    for i in 0..lag_events {
        let msg = format!("lag probe {i}");
        c.post_event(vsphere::events::user_event(&msg)).await?;
        sent.push((msg, Instant::now()));
        // Spread the probes over the poll cycle.
        tokio::time::sleep(Duration::from_millis(370)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < lag_events && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(proc);
    let _ = std::fs::remove_dir_all(&dir);
    let seen = seen.lock().unwrap().clone();
    let mut lags: Vec<u64> = sent
        .iter()
        .filter_map(|(m, t)| {
            seen.iter()
                .find(|(s, _)| s == m)
                .map(|(_, r)| r.duration_since(*t).as_micros() as u64)
        })
        .collect();
    let delivered = lags.len();
    let (p50, p99) = (
        crate::percentile(&mut lags, 0.5),
        crate::percentile(&mut lags, 0.99),
    );
    let max = lags.iter().max().copied().unwrap_or(0) as f64 / 1000.0;
    Ok(format!(
        "| (d) vCenter source: {page_len}-event history page × {rounds} runs read, converted and made durable (start-up time of runs with nothing to convert subtracted) | {convert_per_s:.0} events/s ({total} events) | bare SOAP read + parse of the same page: {read_per_s:.0} events/s | {:.2} | — |\n\
| (e) vCenter event → http action (poll_interval 1s as the bound) | p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms ({delivered}/{lag_events} delivered) | the simulator waking a bare watch after PostEvent: p50 {w50:.0} ms, p99 {w99:.0} ms | reflex's own part p50 {:.0} ms, p99 {:.0} ms | p99 ≤ 100 ms |\n",
        convert_per_s / read_per_s,
        p50 - w50,
        p99 - w99
    ))
}
