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

/// CPU time (user + system) of a process so far, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 * 1000.0 / ticks
}

/// Warm-up, then the measured run; the CPU the process `pid` spent in the measured run.
fn measure(url: &str, script: &std::path::Path, pid: u32) -> Result<(Run, Run, f64)> {
    let warm = wrk(url, 3, script)?;
    let before = cpu_ms(pid);
    let run = wrk(url, 15, script)?;
    let cpu = cpu_ms(pid) - before;
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
) -> Result<String> {
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
    Ok(format!(
        "| {name} | {:.0} requests/s ({} non-2xx{delivery}); {:.3} CPU ms per event; peak RSS {:.1} MB | {reference:.0} requests/s | {:.2} |\n",
        run.per_s,
        run.non_2xx,
        cpu / run.requests.max(1) as f64,
        peak_kb as f64 / 1024.0,
        run.per_s / reference
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
    let mut rows = format!(
        "| reference: no-op axum server | {reference_rate:.0} requests/s; {:.3} CPU ms per request | — | 1 |\n",
        ref_cpu / reference.requests.max(1) as f64
    );
    rows += &reflex_row(
        bin,
        &script,
        "(a) ingest only (webhook mapping, durable, no trigger)",
        "",
        None,
        reference_rate,
    )
    .await?;
    let full = format!(
        "triggers:\n  - name: all\n    action: {{type: http, url: \"http://127.0.0.1:{rport}/fn\", mode: binary}}\n    delivery: {{concurrency: 64}}\n"
    );
    rows += &reflex_row(
        bin,
        &script,
        "(f) full pipeline: one trigger, http action (binary) to a no-op receiver",
        &full,
        Some(&delivered),
        reference_rate,
    )
    .await?;
    rows += &reflex_row(
        bin,
        &script,
        "(g) ingest with 10 `prefix` triggers, none matching",
        &prefix_triggers(10),
        None,
        reference_rate,
    )
    .await?;
    rows += &reflex_row(
        bin,
        &script,
        "(g) ingest with 10,000 `prefix` triggers, none matching",
        &prefix_triggers(10_000),
        None,
        reference_rate,
    )
    .await?;
    let _ = std::fs::remove_file(&script);
    Ok(rows)
}
