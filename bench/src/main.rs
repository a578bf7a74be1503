//! reflex benchmarks. Each figure sits next to a reference measured in the same run on the
//! same machine (a no-op axum server in its own process), so the result is a ratio.
//!
//! `cargo build --release --workspace && target/release/reflex-bench [--seconds N] [--rate R]`
//!
//! (a) durable ingest: events/s into a webhook source (each 202 is fsynced) vs requests/s
//!     of the no-op server, same load generator, same concurrency;
//! (b) end-to-end latency at a fixed rate: webhook → store → trigger → http action → receiver,
//!     p50/p99, vs the round trip of the no-op server at the same rate;
//! (c) RSS of reflex during (b) vs the no-op server's.

mod amqp;
mod cpu;
mod postgres;
mod routing;
mod syslog;
mod vcenter;
mod wrk;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    vcenter: bool,
    seconds: u64,
    rate: u64,
    concurrency: usize,
    results: Option<String>,
    /// Run the PostgreSQL store's figures (h)–(j) against this admin URL instead.
    pg: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        vcenter: true,
        seconds: 10,
        rate: 2000,
        concurrency: 64,
        results: None,
        pg: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().context("missing value");
        match arg.as_str() {
            "--seconds" => a.seconds = val()?.parse()?,
            "--rate" => a.rate = val()?.parse()?,
            "--concurrency" => a.concurrency = val()?.parse()?,
            "--results" => a.results = Some(val()?),
            "--no-vcenter" => a.vcenter = false,
            "--postgres" => a.pg = Some(val()?),
            "wrk" => {
                // The delivery path under wrk: (a), (f), (g).
                let me = std::env::current_exe()?;
                let rt = tokio::runtime::Runtime::new()?;
                print!("{}", rt.block_on(wrk::run(&me.with_file_name("reflex")))?);
                std::process::exit(0);
            }
            "syslog" => {
                // Issue 9's syslog figures: `syslog SECONDS`.
                let secs: u64 = val()?.parse()?;
                let me = std::env::current_exe()?;
                let rt = tokio::runtime::Runtime::new()?;
                print!(
                    "{}",
                    rt.block_on(syslog::run(&me.with_file_name("reflex"), secs))?
                );
                std::process::exit(0);
            }
            "noop-syslog" => return syslog::noop_reader(val()?.parse()?).map(|_| unreachable!()),
            "routing" => {
                // Matching alone: `routing SECONDS`.
                let secs: u64 = val()?.parse()?;
                print!("{}", routing::run(secs)?);
                std::process::exit(0);
            }
            "amqp" => {
                // Issue 8's figures: `amqp SECONDS [POSTGRES_ADMIN_URL]`.
                let secs: u64 = val()?.parse()?;
                let admin = it.next().unwrap_or_else(|| {
                    std::env::var("REFLEX_TEST_PG").unwrap_or_else(|_| {
                        "postgres://reflex:reflex@127.0.0.1:5432/postgres".into()
                    })
                });
                let me = std::env::current_exe()?;
                let rt = tokio::runtime::Runtime::new()?;
                print!(
                    "{}",
                    rt.block_on(amqp::run(&me.with_file_name("reflex"), &admin, secs))?
                );
                std::process::exit(0);
            }
            "vcenter" => {
                // (d) and (e) alone: `vcenter`.
                let me = std::env::current_exe()?;
                let rt = tokio::runtime::Runtime::new()?;
                print!(
                    "{}",
                    rt.block_on(vcenter::run(&me.with_file_name("reflex"), 10, 20))?
                );
                std::process::exit(0);
            }
            "pg-store" => {
                // The PostgreSQL store's ingest alone next to the plain client, for tuning:
                // `pg-store URL SECONDS`.
                let url = val()?;
                let secs: u64 = val()?.parse()?;
                let rt = tokio::runtime::Runtime::new()?;
                println!("{}", rt.block_on(postgres::store_only(&url, secs))?);
                std::process::exit(0);
            }
            "noop-server" => return noop_server(val()?.parse()?).map(|_| unreachable!()),
            "load" => {
                // Load only (for profiling a running server): `load URL SECONDS`.
                let url = val()?;
                let secs: u64 = val()?.parse()?;
                let rt = tokio::runtime::Runtime::new()?;
                let (rps, bad) = rt.block_on(saturate(&url, 64, secs));
                println!("{rps:.0} requests/s ({bad} not 202)");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

/// The reference: an axum server that answers 202 to every POST, in its own process.
fn noop_server(port: u16) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let app = axum::Router::new().fallback(|_body: Bytes| async {
            (axum::http::StatusCode::ACCEPTED, "{\"ids\":[\"x\"]}")
        });
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        axum::serve(l, app).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    std::process::exit(0)
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}
impl Proc {
    /// Starts a process whose output is not needed.
    pub(crate) fn spawn(cmd: &mut Command) -> Result<Proc> {
        Ok(Proc(cmd.stdout(Stdio::null()).spawn()?))
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Its resident memory now and at its peak (kB).
    pub(crate) fn rss_kb(&self) -> (u64, u64) {
        let s =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        let get = |k: &str| {
            s.lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (get("VmRSS:"), get("VmHWM:"))
    }
}

pub(crate) async fn wait_up(url: &str) -> Result<()> {
    let c = reqwest::Client::new();
    for _ in 0..500 {
        if c.get(url).send().await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{url} did not come up")
}

/// Closed-loop load: `concurrency` workers POSTing as fast as answers come back.
async fn saturate(url: &str, concurrency: usize, secs: u64) -> (f64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    let start = Instant::now();
    for w in 0..concurrency {
        let (ok, bad, client, url) = (ok.clone(), bad.clone(), client.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let body = format!("{{\"alert\":\"bench\",\"vm\":\"vm-{w}\",\"id\":\"{w}-{i}\"}}");
                match client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) if r.status().as_u16() == 202 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let n = ok.load(Ordering::Relaxed);
    (
        n as f64 / start.elapsed().as_secs_f64(),
        bad.load(Ordering::Relaxed),
    )
}

/// Open-loop load at `rate`/s; returns the send instants by sequence number.
async fn fixed_rate(
    url: &str,
    rate: u64,
    secs: u64,
    t0: Instant,
    mut on_reply: Option<Arc<Mutex<Vec<u64>>>>,
) -> (u64, u64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = rate * secs;
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let sent = t0.elapsed().as_micros() as u64;
        let body = format!(
            "{{\"alert\":\"lat\",\"vm\":\"vm-{}\",\"id\":\"l-{i}\",\"sent_us\":{sent}}}",
            i % 64
        );
        let (client, url, failed, lat) = (
            client.clone(),
            url.to_string(),
            failed.clone(),
            on_reply.clone(),
        );
        tasks.spawn(async move {
            match client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
            {
                Ok(r) if r.status().as_u16() == 202 => {
                    if let Some(l) = lat {
                        l.lock()
                            .unwrap()
                            .push(t0.elapsed().as_micros() as u64 - sent);
                    }
                }
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    on_reply.take();
    (total, failed.load(Ordering::Relaxed))
}

pub(crate) fn percentile(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let idx = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[idx] as f64 / 1000.0
}

fn reflex_config(
    dir: &std::path::Path,
    http: u16,
    api: u16,
    receiver: Option<u16>,
) -> std::path::PathBuf {
    let trigger = match receiver {
        Some(p) => format!(
            "triggers:\n  - name: fn\n    filters: [{{exact: {{type: alert.lat}}}}]\n    action: {{type: http, url: \"http://127.0.0.1:{p}/fn\"}}\n    delivery: {{concurrency: 64}}\n"
        ),
        None => String::new(),
    };
    let path = dir.join("bench.yaml");
    std::fs::write(
        &path,
        format!(
            "http: {{listen: \"127.0.0.1:{http}\", queue: 100000}}\napi: {{listen: \"127.0.0.1:{api}\"}}\nlog: {{level: warn}}\nstore: {{path: \"{}/bench.db\"}}\nsources:\n  - name: hook\n    type: webhook\n    path: /hook\n    mapping: {{type: \"alert.{{{{ body.alert }}}}\", subject: \"{{{{ body.vm }}}}\", id: \"{{{{ body.id }}}}\"}}\n{trigger}",
            dir.display()
        ),
    )
    .unwrap();
    path
}

pub(crate) fn spawn_reflex(bin: &std::path::Path, cfg: &std::path::Path) -> Result<Proc> {
    Ok(Proc(
        Command::new(bin)
            .args(["run", "-c"])
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting reflex (build it with cargo build --release first)")?,
    ))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let me = std::env::current_exe()?;
    let reflex_bin = me.with_file_name("reflex");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        if let Some(admin) = &args.pg {
            let rows = postgres::run(&reflex_bin, admin, args.seconds, args.concurrency).await?;
            let report = format!(
                "## {} — {}\n\nCommand: `cargo build --release --workspace && target/release/reflex-bench --postgres URL --seconds {} --concurrency {}` (URL: a PostgreSQL role that may create databases, e.g. `postgres://reflex:reflex@127.0.0.1:5432/postgres`; (j) needs the simulator: `bash scripts/test.sh` builds `target/vcsim`, or set `VCSIM_BIN`)\n\n\
| figure | reflex | reference (same run, same server) | ratio | target |\n|---|---|---|---|---|\n{rows}\n",
                now_utc()?,
                machine(),
                args.seconds,
                args.concurrency,
            );
            return write_report(&report, args.results.as_deref());
        }
        let dir = std::env::temp_dir().join(format!("reflex-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;

        // Reference process.
        let noop_port = free_port();
        let noop = Proc(Command::new(&me).args(["noop-server", &noop_port.to_string()]).spawn()?);
        let noop_url = format!("http://127.0.0.1:{noop_port}/hook");
        wait_up(&noop_url).await?;

        // (a) saturation.
        eprintln!("(a) saturating the no-op server for {}s…", args.seconds);
        let (noop_rps, _) = saturate(&noop_url, args.concurrency, args.seconds).await;
        let (http, api) = (free_port(), free_port());
        let cfg = reflex_config(&dir, http, api, None);
        let reflex = spawn_reflex(&reflex_bin, &cfg)?;
        wait_up(&format!("http://127.0.0.1:{api}/healthz")).await?;
        let url = format!("http://127.0.0.1:{http}/hook");
        eprintln!("(a) saturating reflex (durable ingest) for {}s…", args.seconds);
        let (reflex_eps, reflex_bad) = saturate(&url, args.concurrency, args.seconds).await;
        drop(reflex);
        // The machine is noisy: measure the reference again after reflex and use the mean.
        eprintln!("(a) saturating the no-op server again…");
        let (noop_rps2, _) = saturate(&noop_url, args.concurrency, args.seconds).await;
        let noop_rps = (noop_rps + noop_rps2) / 2.0;

        // (b) + (c) fixed rate, end to end.
        let received: Arc<Mutex<Vec<u64>>> = Arc::default();
        let t0 = Instant::now();
        let recv_port = free_port();
        {
            let received = received.clone();
            let app = axum::Router::new().fallback(move |body: Bytes| {
                let received = received.clone();
                async move {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                        if let Some(sent) = v["sent_us"].as_u64() {
                            received.lock().unwrap().push(t0.elapsed().as_micros() as u64 - sent);
                        }
                    }
                    "ok"
                }
            });
            let l = tokio::net::TcpListener::bind(("127.0.0.1", recv_port)).await?;
            tokio::spawn(async move { axum::serve(l, app).await });
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let (http, api) = (free_port(), free_port());
        let cfg = reflex_config(&dir, http, api, Some(recv_port));
        let reflex = spawn_reflex(&reflex_bin, &cfg)?;
        wait_up(&format!("http://127.0.0.1:{api}/healthz")).await?;
        let url = format!("http://127.0.0.1:{http}/hook");
        eprintln!("(b) {} events/s for {}s through reflex to an http action…", args.rate, args.seconds);
        let rss_peak = Arc::new(AtomicU64::new(0));
        let sampler = {
            let pid = reflex.0.id();
            let peak = rss_peak.clone();
            tokio::spawn(async move {
                loop {
                    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    if let Some(kb) = s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()) {
                        peak.fetch_max(kb, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let (sent, failed) = fixed_rate(&url, args.rate, args.seconds, t0, None).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while (received.lock().unwrap().len() as u64) < sent - failed && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sampler.abort();
        let (_, reflex_hwm) = reflex.rss_kb();
        let reflex_rss = rss_peak.load(Ordering::Relaxed);
        drop(reflex);
        let mut lat = received.lock().unwrap().clone();
        let delivered = lat.len();
        let (p50, p99) = (percentile(&mut lat, 0.50), percentile(&mut lat, 0.99));

        eprintln!("(b) reference: the no-op server's round trip at the same rate…");
        let noop_lat: Arc<Mutex<Vec<u64>>> = Arc::default();
        let t1 = Instant::now();
        fixed_rate(&noop_url, args.rate, args.seconds, t1, Some(noop_lat.clone())).await;
        let mut nl = noop_lat.lock().unwrap().clone();
        let (np50, np99) = (percentile(&mut nl, 0.50), percentile(&mut nl, 0.99));
        let (noop_rss, _) = noop.rss_kb();
        drop(noop);
        let _ = std::fs::remove_dir_all(&dir);

        let machine = machine();
        let date = now_utc()?;
        let report = format!(
            "## {date_t} — {machine}\n\nCommand: `cargo build --release --workspace && target/release/reflex-bench --seconds {s} --rate {r} --concurrency {c}` (needs the simulator: `bash scripts/test.sh` builds `target/vcsim`, or set `VCSIM_BIN`)\n\n\
| figure | reflex | reference (no-op axum server, same run) | ratio | target |\n|---|---|---|---|---|\n\
| (a) durable ingest, closed loop, {c} connections | {reflex_eps:.0} events/s ({reflex_bad} non-202) | {noop_rps:.0} requests/s (mean of a run before and one after) | {ra:.2} | ≥ 0.5 |\n\
| (b) end-to-end latency at {r}/s (webhook → fsync → http action) | p50 {p50:.2} ms, p99 {p99:.2} ms ({delivered}/{sent} delivered, {failed} refused) | round trip p50 {np50:.2} ms, p99 {np99:.2} ms | p99 ×{rl:.1} | p99 ≤ 10 ms |\n\
| (c) RSS during (b) | peak {rm:.1} MB (VmHWM {hm:.1} MB) | {nm:.1} MB | ×{rr:.1} | ≤ 100 MB |\n",
            date_t = date,
            s = args.seconds,
            r = args.rate,
            c = args.concurrency,
            ra = reflex_eps / noop_rps,
            rl = p99 / np99,
            rm = reflex_rss as f64 / 1024.0,
            hm = reflex_hwm as f64 / 1024.0,
            nm = noop_rss as f64 / 1024.0,
            rr = reflex_rss as f64 / noop_rss.max(1) as f64,
        );
        let mut report = report;
        if args.vcenter {
            report.push_str(&vcenter::run(&reflex_bin, 10, 20).await?);
        }
        report.push('\n');
        write_report(&report, args.results.as_deref())
    })
}

/// Prints the report and appends it to the results file when one is given.
fn write_report(report: &str, results: Option<&str>) -> Result<()> {
    print!("{report}");
    if let Some(path) = results {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        f.write_all(report.as_bytes())?;
    }
    Ok(())
}

/// Cores and CPU model, for the report's heading.
fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {model}")
}

fn now_utc() -> Result<String> {
    let out = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}
