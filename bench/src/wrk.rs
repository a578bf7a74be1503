//! The delivery path under wrk (Debian's package): POSTs of 1 KB JSON bodies, 512 with
//! varied hostnames built once by a Lua script, 64 connections, a 3 s warm-up then 15 s.
//! Each configuration runs next to a no-op axum server under the same load in the same run:
//! (a) ingest only (the webhook mapping, no trigger); (f) the full pipeline, one trigger
//! matching every event with an `http` action in binary mode to a no-op receiver on
//! 127.0.0.1; (g) ingest with 10 and with 10,000 `prefix` triggers, none matching.

use anyhow::{bail, Context, Result};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LUA: &str = r#"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {}
local n = 0
function init(args)
  for i = 1, 512 do
    local head = string.format(
      '{"alert":"disk_full","severity":"critical","vm":"vm-%03d","host":"esx-%03d.rack%d.dc%d.example.com","message":"',
      i, i, i % 16, i % 4)
    bodies[i] = head .. string.rep("x", 1024 - #head - 2) .. '"}'
  end
end
function request()
  n = n + 1
  return wrk.format(nil, nil, nil, bodies[(n % 512) + 1])
end
"#;

/// What wrk reported for one run.
struct Run {
    requests: u64,
    non_2xx: u64,
    per_s: f64,
}

fn wrk(url: &str, secs: u64, script: &std::path::Path) -> Result<Run> {
    let out = Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{secs}s"), "-s"])
        .arg(script)
        .arg(url)
        .output()
        .context("running wrk (Debian: apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let num = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no request count in wrk's output: {text}"))?;
    Ok(Run {
        requests,
        non_2xx: num("Non-2xx or 3xx responses:").unwrap_or(0.0) as u64,
        per_s: num("Requests/sec:").with_context(|| format!("no rate in wrk's output: {text}"))?,
    })
}

/// CPU (ms) of a measured run, by process.
struct Cpu {
    /// The server under load (reflex or the no-op reference).
    server: f64,
    /// wrk itself.
    wrk: f64,
    /// This process: (f)'s receiver.
    bench: f64,
    /// The whole machine's busy and idle time (all cores).
    busy: f64,
    idle: f64,
}

/// CPU (ms) of every child process this one has waited for: wrk's runs.
fn children_ms() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(u.ru_utime) + ms(u.ru_stime)
}

/// Warm-up, then the measured run; the CPU of the process `pid`, of wrk and of this
/// process in the measured run.
fn measure(url: &str, script: &std::path::Path, pid: u32) -> Result<(Run, Run, Cpu)> {
    let warm = wrk(url, 3, script)?;
    let (server, wrk_ms, bench, (busy, idle)) = (
        crate::cpu::of_pid(pid),
        children_ms(),
        crate::cpu::of_pid(std::process::id()),
        crate::cpu::machine_ms(),
    );
    let run = wrk(url, 15, script)?;
    let (busy2, idle2) = crate::cpu::machine_ms();
    let cpu = Cpu {
        server: crate::cpu::of_pid(pid) - server,
        wrk: children_ms() - wrk_ms,
        bench: crate::cpu::of_pid(std::process::id()) - bench,
        busy: busy2 - busy,
        idle: idle2 - idle,
    };
    Ok((warm, run, cpu))
}

fn config(
    dir: &std::path::Path,
    http: u16,
    api: u16,
    triggers: &str,
) -> Result<std::path::PathBuf> {
    let path = dir.join("wrk.yaml");
    std::fs::write(
        &path,
        format!(
            "http: {{listen: \"127.0.0.1:{http}\", queue: 100000}}\napi: {{listen: \"127.0.0.1:{api}\"}}\nlog: {{level: warn}}\nstore: {{path: \"{}/wrk.db\"}}\nsources:\n  - name: hook\n    type: webhook\n    path: /hook\n    mapping: {{type: \"alert.{{{{ body.alert }}}}\", subject: \"{{{{ body.vm }}}}\"}}\n{triggers}",
            dir.display()
        ),
    )?;
    Ok(path)
}

/// One configuration of reflex under the load; its row of the report.
async fn reflex_row(
    bin: &std::path::Path,
    script: &std::path::Path,
    name: &str,
    triggers: &str,
    delivered: Option<&Arc<AtomicU64>>,
    reference: f64,
) -> Result<(String, f64)> {
    let dir = std::env::temp_dir().join(format!("reflex-bench-wrk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (http, api) = (crate::free_port(), crate::free_port());
    let cfg = config(&dir, http, api, triggers)?;
    let proc = crate::spawn_reflex(bin, &cfg)?;
    crate::wait_up(&format!("http://127.0.0.1:{api}/readyz")).await?;
    eprintln!("({name}) under wrk…");
    let url = format!("http://127.0.0.1:{http}/hook");
    let (pid, script2, url2) = (proc.pid(), script.to_path_buf(), url.clone());
    let (warm, run, cpu) =
        tokio::task::spawn_blocking(move || measure(&url2, &script2, pid)).await??;
    let acknowledged = warm.requests - warm.non_2xx + run.requests - run.non_2xx;
    let delivery = match delivered {
        Some(count) => {
            // Every 202'd event delivered: wait for the backlog to drain.
            let deadline = Instant::now() + Duration::from_secs(120);
            while count.load(Ordering::Relaxed) < acknowledged && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            format!(
                ", {}/{acknowledged} delivered",
                count.load(Ordering::Relaxed)
            )
        }
        None => String::new(),
    };
    let (_, peak_kb) = proc.rss_kb();
    drop(proc);
    let _ = std::fs::remove_dir_all(&dir);
    let n = run.requests.max(1) as f64;
    let receiver = if delivered.is_some() {
        format!(", the receiver {:.3}", cpu.bench / n)
    } else {
        String::new()
    };
    Ok((
        format!(
            "| {name} | {:.0} requests/s ({} non-2xx{delivery}); {:.3} CPU ms per event (wrk {:.3}{receiver}; the machine {:.0} % busy); peak RSS {:.1} MB | {reference:.0} requests/s | {:.2} |\n",
            run.per_s,
            run.non_2xx,
            cpu.server / n,
            cpu.wrk / n,
            cpu.busy * 100.0 / (cpu.busy + cpu.idle).max(1.0),
            peak_kb as f64 / 1024.0,
            run.per_s / reference
        ),
        (cpu.server + cpu.wrk + if delivered.is_some() { cpu.bench } else { 0.0 }) / n,
    ))
}

fn prefix_triggers(n: usize) -> String {
    let mut t = String::from("triggers:\n");
    for i in 0..n {
        t.push_str(&format!(
            "  - {{name: t{i}, filters: [{{prefix: {{type: \"nomatch.{i}.\"}}}}], action: {{type: http, url: \"http://127.0.0.1:1/\"}}}}\n"
        ));
    }
    t
}

/// Runs (a), (f) and (g); returns the report's rows.
pub async fn run(bin: &std::path::Path) -> Result<String> {
    if Command::new("wrk").arg("--version").output().is_err() {
        bail!("wrk is not installed (Debian: apt-get install wrk)");
    }
    let script = std::env::temp_dir().join(format!("reflex-bench-{}.lua", std::process::id()));
    std::fs::write(&script, LUA)?;
    // The reference: a no-op axum server in its own process, under the same load.
    let port = crate::free_port();
    let me = std::env::current_exe()?;
    let noop = crate::Proc::spawn(Command::new(&me).args(["noop-server", &port.to_string()]))?;
    crate::wait_up(&format!("http://127.0.0.1:{port}/")).await?;
    eprintln!("reference: the no-op server under wrk…");
    let (s2, u2, pid) = (
        script.clone(),
        format!("http://127.0.0.1:{port}/hook"),
        noop.pid(),
    );
    let (_, reference, ref_cpu) =
        tokio::task::spawn_blocking(move || measure(&u2, &s2, pid)).await??;
    drop(noop);
    let reference_rate = reference.per_s;

    // (f)'s receiver: a no-op axum server in this process that counts what arrives.
    let delivered = Arc::new(AtomicU64::new(0));
    let rport = crate::free_port();
    {
        let delivered = delivered.clone();
        let app = axum::Router::new().fallback(move || {
            let delivered = delivered.clone();
            async move {
                delivered.fetch_add(1, Ordering::Relaxed);
                "ok"
            }
        });
        let l = tokio::net::TcpListener::bind(("127.0.0.1", rport)).await?;
        tokio::spawn(async move { axum::serve(l, app).await });
    }
    let n = reference.requests.max(1) as f64;
    let mut rows = format!(
        "| reference: no-op axum server | {reference_rate:.0} requests/s; {:.3} CPU ms per request (wrk {:.3}; the machine {:.0} % busy) | — | 1 |\n",
        ref_cpu.server / n,
        ref_cpu.wrk / n,
        ref_cpu.busy * 100.0 / (ref_cpu.busy + ref_cpu.idle).max(1.0),
    );
    let (row, a_cpu) = reflex_row(
        bin,
        &script,
        "(a) ingest only (webhook mapping, durable, no trigger)",
        "",
        None,
        reference_rate,
    )
    .await?;
    rows += &row;
    let full = format!(
        "triggers:\n  - name: all\n    action: {{type: http, url: \"http://127.0.0.1:{rport}/fn\", mode: binary}}\n    delivery: {{concurrency: 64}}\n"
    );
    let (row, f_cpu) = reflex_row(
        bin,
        &script,
        "(f) full pipeline: one trigger, http action (binary) to a no-op receiver",
        &full,
        Some(&delivered),
        reference_rate,
    )
    .await?;
    rows += &row;
    rows += &reflex_row(
        bin,
        &script,
        "(g) ingest with 10 `prefix` triggers, none matching",
        &prefix_triggers(10),
        None,
        reference_rate,
    )
    .await?
    .0;
    rows += &reflex_row(
        bin,
        &script,
        "(g) ingest with 10,000 `prefix` triggers, none matching",
        &prefix_triggers(10_000),
        None,
        reference_rate,
    )
    .await?
    .0;
    let _ = std::fs::remove_file(&script);
    // The cores a target would take at this run's CPU per event (the server's, wrk's and
    // the receiver's), against the machine's: above that, the target needs less CPU per
    // event, not less waiting.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    rows += &format!(
        "\nAt this run's CPU per event (server + wrk + receiver), (a) at 0.6 × the reference ({:.0} requests/s) would take {:.2} cores and (f) at 0.3 × ({:.0}) {:.2} cores, of the machine's {cores}.\n",
        0.6 * reference_rate,
        0.6 * reference_rate * a_cpu / 1000.0,
        0.3 * reference_rate,
        0.3 * reference_rate * f_cpu / 1000.0,
    );
    Ok(rows)
}
