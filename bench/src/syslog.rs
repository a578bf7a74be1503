//! Issue 9's syslog figures: RFC 5424 lines matched by a rule and stored, over TCP, next to a
//! no-op TCP reader in its own process that only frames the lines (same sender, same run);
//! and the share of UDP datagrams lost at 10,000 lines/s.

use anyhow::{Context, Result};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Lines in one write of the sender.
const CHUNK_LINES: usize = 512;
/// TCP connections of the sender.
const CONNECTIONS: usize = 4;

fn line(i: usize) -> String {
    format!(
        "<34>1 2026-11-30T10:00:00.000Z esx-{:03}.example.com sshd 4242 ID47 - VM web-{:03} is compromised: outbound beacon to 203.0.113.{}\n",
        i % 256,
        i % 512,
        i % 250
    )
}

/// One write's worth of lines.
fn chunk() -> Vec<u8> {
    (0..CHUNK_LINES)
        .flat_map(|i| line(i).into_bytes())
        .collect()
}

/// A reader that frames lines and drops them: `noop-syslog PORT` (runs until killed).
pub fn noop_reader(port: u16) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        loop {
            let (mut s, _) = l.accept().await?;
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut lines = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64,
                    }
                }
                std::hint::black_box(lines);
            });
        }
    })
}

/// Sends as fast as the reader takes them for `secs`; the lines sent.
async fn send_tcp(port: u16, secs: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let data = std::sync::Arc::new(chunk());
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let mut sent = 0u64;
            while Instant::now() < deadline {
                s.write_all(&data).await?;
                sent += CHUNK_LINES as u64;
            }
            s.shutdown().await?;
            anyhow::Ok(sent)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

/// `reflex_events_received_total` of the source `logs`, and its `udp_overrun` count.
async fn stored(api: &str) -> Result<(u64, u64)> {
    let text = reqwest::get(format!("{api}/metrics")).await?.text().await?;
    let value = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    Ok((
        value("reflex_events_received_total{source=\"logs\"} "),
        value("reflex_events_rejected_total{source=\"logs\",reason=\"udp_overrun\"} "),
    ))
}

/// Waits until the stored count stops growing; the count and when it last grew.
async fn settle(api: &str, started: Instant) -> Result<(u64, Duration)> {
    let mut last = stored(api).await?.0;
    let mut grew = started.elapsed();
    let mut quiet = 0;
    while quiet < 10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = stored(api).await?.0;
        if now > last {
            last = now;
            grew = started.elapsed();
            quiet = 0;
        } else {
            quiet += 1;
        }
    }
    Ok((last, grew))
}

/// Runs both figures; returns the report's rows.
pub async fn run(bin: &std::path::Path, secs: u64) -> Result<String> {
    let me = std::env::current_exe()?;
    // The reference: the no-op reader under the same sender.
    let port = crate::free_port();
    let noop = crate::Proc::spawn(Command::new(&me).args(["noop-syslog", &port.to_string()]))?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("reference: the no-op TCP reader…");
    let t0 = Instant::now();
    let sent = send_tcp(port, secs).await?;
    let reference = sent as f64 / t0.elapsed().as_secs_f64();
    drop(noop);

    let dir = std::env::temp_dir().join(format!("reflex-bench-syslog-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (http, api, tcp, udp) = (
        crate::free_port(),
        crate::free_port(),
        crate::free_port(),
        crate::free_port(),
    );
    let cfg = dir.join("syslog.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"http: {{listen: "127.0.0.1:{http}"}}
api: {{listen: "127.0.0.1:{api}"}}
log: {{level: warn}}
store: {{path: "{}/syslog.db"}}
sources:
  - name: logs
    type: syslog
    tcp: 127.0.0.1:{tcp}
    udp: 127.0.0.1:{udp}
    rules:
      - match: 'VM (?P<vm>\S+) is compromised'
        event_type: security.compromised
        subject: "{{{{ captures.vm }}}}"
"#,
            dir.display()
        ),
    )?;
    let reflex = crate::spawn_reflex(bin, &cfg)?;
    let api = format!("http://127.0.0.1:{api}");
    crate::wait_up(&format!("{api}/readyz")).await?;
    eprintln!("reflex: syslog over TCP…");
    let t0 = Instant::now();
    let sent = send_tcp(tcp, secs).await.context("sending to reflex")?;
    let (got, took) = settle(&api, t0).await?;
    let rate = got as f64 / took.as_secs_f64();

    // UDP at 10,000 lines/s: 10 datagrams every millisecond.
    eprintln!("reflex: syslog over UDP at 10,000 lines/s…");
    let before = stored(&api).await?;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.connect(("127.0.0.1", udp)).await?;
    let lines: Vec<Vec<u8>> = (0..512).map(|i| line(i).into_bytes()).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut udp_sent = 0u64;
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        for _ in 0..10 {
            sock.send(&lines[udp_sent as usize % lines.len()]).await?;
            udp_sent += 1;
        }
    }
    let send_rate = udp_sent as f64 / t1.elapsed().as_secs_f64();
    let (after_count, _) = settle(&api, t1).await?;
    let after = stored(&api).await?;
    let udp_got = after_count - before.0;
    let overrun = after.1 - before.1;
    drop(reflex);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(format!(
        "| syslog over TCP: RFC 5424 lines matched by a regex rule and stored, {CONNECTIONS} connections | {rate:.0} lines/s ({got} of {sent} sent stored) | no-op TCP reader framing lines, same sender: {reference:.0} lines/s | {:.4} | ≥ 0.5 |\n\
         | syslog over UDP at {send_rate:.0} lines/s for {secs} s | {udp_got} of {udp_sent} stored ({:.2} % lost; the socket's overrun count: {overrun}) | — | — | drop rate reported |\n",
        rate / reference,
        100.0 * (udp_sent - udp_got.min(udp_sent)) as f64 / udp_sent as f64
    ))
}
