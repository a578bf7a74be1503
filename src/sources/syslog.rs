//! `type: syslog` — RFC 3164 and RFC 5424 messages over UDP and over TCP (octet-counting
//! or newline framing, RFC 6587). Rules (a regex with named captures over the message,
//! optionally only for one app) turn lines into events; the first rule that matches wins,
//! and a line no rule matches is counted, not stored.
//!
//! What is not stored is counted in `reflex_events_rejected_total{source, reason}`:
//! `unmatched`, `invalid_utf8`, `oversized`, `stalled` (a TCP client that stops mid-frame
//! for `idle_timeout`), `mapping` (a rule's template failed), and on UDP `udp_overrun` (the
//! kernel's drop count of the socket, read from `/proc/net/udp`) and `store` (the store
//! refused a batch). Over TCP a connection's lines are stored before more of it is read:
//! a slow store slows the sender (backpressure), nothing read is dropped for it.

use crate::config::TlsConfig;
use crate::config::{ByteSize, Config, Diagnostics, Text};
use crate::ingest::{Ingest, IngestError};
use crate::listener::tls_acceptor;
use crate::template::Template;
use bytes::{Buf, BytesMut};
use cloudevents::{Event, EventBuilder, EventBuilderV10};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

/// Configuration of `type: syslog`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// Unique source name.
    #[schemars(with = "String")]
    pub name: Text,
    /// Address to receive UDP datagrams on, e.g. `0.0.0.0:514` (best effort: see the docs).
    pub udp: Option<String>,
    /// Address to accept TCP connections on, e.g. `0.0.0.0:601`.
    pub tcp: Option<String>,
    /// Longest frame accepted (default 64KiB); longer ones are counted and skipped.
    pub max_frame: Option<ByteSize>,
    /// A TCP connection that sends nothing for this long in the middle of a frame is closed
    /// (default 30s).
    pub idle_timeout: Option<crate::config::Duration>,
    /// Most TCP connections at once (default 1024); more wait to be accepted.
    pub max_connections: Option<usize>,
    /// TLS on the TCP listener (RFC 5425): the server's certificate chain and key, PEM.
    pub tls: Option<TlsConfig>,
    /// How lines become events; the first rule that matches wins.
    pub rules: Vec<RuleConfig>,
}

/// One rule: which lines, and the event they become.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// A regular expression over the message text; named groups (`(?P<vm>\S+)`) are
    /// `captures.NAME` in the templates. `.` matches every line.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Only lines from this app name (the RFC 5424 APP-NAME or the RFC 3164 tag).
    pub app: Option<String>,
    /// The event type, a template over `syslog` and `captures`.
    pub event_type: String,
    /// The subject, a template (e.g. `{{ captures.vm }}`).
    pub subject: Option<String>,
    /// The data as JSON, a template; `{syslog: {...}, captures: {...}}` by default.
    pub data: Option<String>,
}

struct Rule {
    pattern: regex::Regex,
    app: Option<String>,
    event_type: Template,
    subject: Option<Template>,
    data: Option<Template>,
}

/// A compiled syslog source; its sockets are bound by [`Syslog::bind`].
pub struct Syslog {
    name: String,
    udp: Option<SocketAddr>,
    tcp: Option<SocketAddr>,
    max_frame: usize,
    idle_timeout: Duration,
    max_connections: usize,
    rules: Vec<Rule>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    bound_udp: Option<UdpSocket>,
    bound_tcp: Option<TcpListener>,
}

/// Lines read from one datagram or connection and stored together.
const BATCH: usize = 256;
/// Datagrams received and waiting to be stored; past it they are counted and dropped.
const UDP_QUEUE: usize = 65_536;
/// The UDP receive buffer asked of the kernel (it grants at most `net.core.rmem_max`).
const UDP_RECEIVE_BUFFER: usize = 8 << 20;

impl Syslog {
    /// Compiles the rules and checks the addresses.
    pub fn build(
        c: &SyslogConfig,
        loc: &serde_saphyr::Location,
        _config: &Config,
        diags: &mut Diagnostics,
    ) -> Option<Syslog> {
        let name = &c.name.value;
        let mut ok = true;
        let mut addr = |field: &str, v: &Option<String>| -> Option<SocketAddr> {
            let v = v.as_ref()?;
            match v.parse() {
                Ok(a) => Some(a),
                Err(_) => {
                    diags.at(
                        loc,
                        format!(
                            "source `{name}`: {field} `{v}` is not an address like `0.0.0.0:514`"
                        ),
                    );
                    ok = false;
                    None
                }
            }
        };
        let udp = addr("udp", &c.udp);
        let tcp = addr("tcp", &c.tcp);
        if c.udp.is_none() && c.tcp.is_none() {
            diags.at(
                loc,
                format!("source `{name}`: give `udp`, `tcp` or both (the addresses to listen on)"),
            );
            ok = false;
        }
        let tls = match &c.tls {
            None => None,
            Some(_) if c.tcp.is_none() => {
                diags.at(
                    loc,
                    format!("source `{name}`: `tls` needs a `tcp` listener"),
                );
                ok = false;
                None
            }
            Some(t) => match tls_acceptor(t) {
                Ok(a) => Some(a),
                Err(e) => {
                    diags.at(loc, format!("source `{name}`: tls: {e}"));
                    ok = false;
                    None
                }
            },
        };
        if c.rules.is_empty() {
            diags.at(
                loc,
                format!("source `{name}`: no rules; lines that match no rule are not stored (use `match: .` to take every line)"),
            );
            ok = false;
        }
        let mut rules = Vec::new();
        for (i, r) in c.rules.iter().enumerate() {
            let mut tpl = |field: &str, src: Option<&str>| -> Option<Template> {
                match Template::compile(src?) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        diags.at(loc, format!("source `{name}`: rules[{i}].{field}: {e}"));
                        ok = false;
                        None
                    }
                }
            };
            let event_type = tpl("event_type", Some(&r.event_type));
            let subject = tpl("subject", r.subject.as_deref());
            let data = tpl("data", r.data.as_deref());
            let pattern = match regex::Regex::new(&r.pattern) {
                Ok(p) => Some(p),
                Err(e) => {
                    diags.at(
                        loc,
                        format!(
                            "source `{name}`: rules[{i}].match is not a regular expression: {e}"
                        ),
                    );
                    ok = false;
                    None
                }
            };
            if let (Some(pattern), Some(event_type)) = (pattern, event_type) {
                rules.push(Rule {
                    pattern,
                    app: r.app.clone(),
                    event_type,
                    subject,
                    data,
                });
            }
        }
        if !ok {
            return None;
        }
        Some(Syslog {
            name: name.clone(),
            udp,
            tcp,
            max_frame: c.max_frame.map_or(64 * 1024, |b| b.0).max(16),
            idle_timeout: c.idle_timeout.map_or(Duration::from_secs(30), |d| d.0),
            max_connections: c.max_connections.unwrap_or(1024).max(1),
            rules,
            tls,
            bound_udp: None,
            bound_tcp: None,
        })
    }

    /// The source's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Binds the source's sockets, so that a taken port stops the start with its reason.
    pub async fn bind(&mut self) -> anyhow::Result<()> {
        use anyhow::Context;
        if let Some(a) = self.udp {
            let socket = UdpSocket::bind(a)
                .await
                .with_context(|| format!("source `{}`: cannot listen on udp {a}", self.name))?;
            // A larger buffer absorbs bursts; the kernel may grant less, which is fine.
            let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(UDP_RECEIVE_BUFFER);
            self.bound_udp = Some(socket);
        }
        if let Some(a) = self.tcp {
            self.bound_tcp =
                Some(TcpListener::bind(a).await.with_context(|| {
                    format!("source `{}`: cannot listen on tcp {a}", self.name)
                })?);
        }
        Ok(())
    }

    /// Receives until `shutdown`.
    pub async fn run(mut self, ingest: Ingest, shutdown: CancellationToken) {
        let udp = self.bound_udp.take();
        let tcp = self.bound_tcp.take();
        let this = Arc::new(self);
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(s) = udp {
            tasks.spawn(this.clone().serve_udp(s, ingest.clone(), shutdown.clone()));
        }
        if let Some(l) = tcp {
            tasks.spawn(this.clone().serve_tcp(l, ingest, shutdown));
        }
        while tasks.join_next().await.is_some() {}
    }

    fn count(&self, ingest: &Ingest, reason: &str, n: u64) {
        ingest.metrics().events_rejected_n(&self.name, reason, n);
    }

    /// The event of one line, `Ok(None)` when no rule matches it.
    fn event(&self, raw: &str) -> Result<Option<Event>, String> {
        let m = syslog_loose::parse_message(raw, syslog_loose::Variant::Either);
        let app = m.appname.unwrap_or("");
        let Some((rule, caps)) = self.rules.iter().find_map(|r| {
            if r.app.as_deref().is_some_and(|a| a != app) {
                return None;
            }
            r.pattern.captures(m.msg).map(|c| (r, c))
        }) else {
            return Ok(None);
        };
        let captures: serde_json::Map<String, Value> = rule
            .pattern
            .capture_names()
            .flatten()
            .filter_map(|n| caps.name(n).map(|v| (n.to_string(), json!(v.as_str()))))
            .collect();
        let structured: serde_json::Map<String, Value> = m
            .structured_data
            .iter()
            .map(|e| {
                let params: serde_json::Map<String, Value> =
                    e.params().map(|(k, v)| (k.to_string(), json!(v))).collect();
                (e.id.to_string(), Value::Object(params))
            })
            .collect();
        let syslog = json!({
            "host": m.hostname,
            "app": m.appname,
            "procid": m.procid.as_ref().map(|p| p.to_string()),
            "msgid": m.msgid,
            "severity": m.severity.map(|s| s.as_str()),
            "facility": m.facility.map(|f| f.as_str()),
            "timestamp": m.timestamp.map(|t| t.to_rfc3339()),
            "structured_data": structured,
            "message": m.msg,
        });
        let ctx = minijinja::context! {
            syslog => minijinja::Value::from(minijinja::value::Serde(&syslog)),
            captures => minijinja::Value::from(minijinja::value::Serde(&captures)),
        };
        let render = |field: &str, t: &Template| {
            t.render_value(&ctx)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("{field}: {e}"))
        };
        let ty = render("event_type", &rule.event_type)?;
        if ty.is_empty() {
            return Err("event_type rendered empty".into());
        }
        let data = match &rule.data {
            Some(t) => {
                let s = render("data", t)?;
                serde_json::from_str(&s).unwrap_or(Value::String(s))
            }
            None => json!({"syslog": syslog, "captures": captures}),
        };
        let time = m
            .timestamp
            .map(|t| t.with_timezone(&chrono::Utc))
            .unwrap_or_else(chrono::Utc::now);
        let mut b = EventBuilderV10::new()
            .id(uuid::Uuid::now_v7().to_string())
            .source(format!("/reflex/sources/{}", self.name))
            .ty(ty)
            .time(time)
            .data("application/json", data);
        if let Some(t) = &rule.subject {
            let s = render("subject", t)?;
            if !s.is_empty() {
                b = b.subject(s);
            }
        }
        b.build().map(Some).map_err(|e| e.to_string())
    }

    /// Frames a TCP stream that arrives in chunks of `chunk` bytes and maps every frame by
    /// the rules, as a connection does; the number of events made (the fuzz target).
    pub(crate) fn frame_and_map(&self, data: &[u8], chunk: usize) -> usize {
        let mut framer = Framer::new(self.max_frame);
        let mut buf = BytesMut::new();
        let mut made = 0;
        let mut map = |frame: &[u8]| {
            if let Ok(line) = std::str::from_utf8(trim_frame(frame)) {
                if let Ok(Some(e)) = self.event(line) {
                    let _ = crate::event::to_json(&e);
                    made += 1;
                }
            }
        };
        for piece in data.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match framer.next(&mut buf) {
                    Next::Frame(f) => map(&f),
                    Next::Oversized => {}
                    Next::More => break,
                }
            }
        }
        if let Some(f) = framer.rest(&mut buf) {
            map(&f);
        }
        made
    }

    /// The events of some frames, counting what is not stored.
    fn events(&self, ingest: &Ingest, frames: &[&[u8]]) -> Vec<Event> {
        self.events_counted(ingest, frames, true)
    }

    /// The events of some frames; what is not stored is counted when `count` (not when a
    /// batch is made again to be retried).
    fn events_counted(&self, ingest: &Ingest, frames: &[&[u8]], count: bool) -> Vec<Event> {
        let ingest_count = |reason: &str| {
            if count {
                self.count(ingest, reason, 1)
            }
        };
        let mut out = Vec::with_capacity(frames.len());
        for f in frames {
            let Ok(line) = std::str::from_utf8(f) else {
                ingest_count("invalid_utf8");
                continue;
            };
            match self.event(line) {
                Ok(Some(e)) => out.push(e),
                Ok(None) => ingest_count("unmatched"),
                Err(e) => {
                    tracing::debug!(source = %self.name, error = %e, "a syslog rule's template failed");
                    ingest_count("mapping")
                }
            }
        }
        out
    }

    /// Receives datagrams into a bounded queue while another task stores them, so that a
    /// slow commit does not leave them in the kernel's buffer to overflow.
    async fn serve_udp(
        self: Arc<Self>,
        socket: UdpSocket,
        ingest: Ingest,
        shutdown: CancellationToken,
    ) {
        let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(UDP_QUEUE);
        let storer = {
            let (this, ingest) = (self.clone(), ingest.clone());
            tokio::spawn(async move {
                let mut bufs = Vec::with_capacity(BATCH);
                while rx.recv_many(&mut bufs, BATCH).await > 0 {
                    let frames: Vec<&[u8]> = bufs
                        .iter()
                        .map(|b| trim_frame(b))
                        .filter(|b| {
                            let big = b.len() > this.max_frame;
                            if big {
                                this.count(&ingest, "oversized", 1);
                            }
                            !big && !b.is_empty()
                        })
                        .collect();
                    let events = this.events(&ingest, &frames);
                    bufs.clear();
                    if !events.is_empty() {
                        let n = events.len() as u64;
                        if let Err(e) = ingest.submit(&this.name, events).await {
                            tracing::warn!(source = %this.name, error = %e, lines = n, "udp lines not stored (UDP is best effort)");
                            this.count(&ingest, "store", n);
                        }
                    }
                }
            })
        };
        let mut drops = udp_drops(port).unwrap_or(0);
        let mut checked = tokio::time::Instant::now();
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, _) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = socket.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(source = %self.name, error = %e, "udp receive failed");
                        continue;
                    }
                },
            };
            if tx.try_send(buf[..n].to_vec()).is_err() {
                self.count(&ingest, "udp_queue_full", 1);
            }
            if checked.elapsed() >= Duration::from_secs(1) {
                checked = tokio::time::Instant::now();
                if let Some(now) = udp_drops(port) {
                    if now > drops {
                        self.count(&ingest, "udp_overrun", now - drops);
                        tracing::warn!(source = %self.name, dropped = now - drops, "the kernel dropped udp datagrams (receive buffer full); use tcp for what must not be lost, or raise net.core.rmem_max");
                    }
                    drops = now;
                }
            }
        }
        drop(tx);
        let _ = storer.await;
    }

    async fn serve_tcp(
        self: Arc<Self>,
        listener: TcpListener,
        ingest: Ingest,
        shutdown: CancellationToken,
    ) {
        let permits = Arc::new(tokio::sync::Semaphore::new(self.max_connections));
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(source = %self.name, error = %e, "tcp accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let (this, ingest, stop) = (self.clone(), ingest.clone(), shutdown.clone());
            conns.spawn(async move {
                match &this.tls {
                    None => this.connection(stream, peer, &ingest, &stop).await,
                    Some(acceptor) => {
                        // The handshake is bounded like any silence mid-frame.
                        match tokio::time::timeout(this.idle_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => this.connection(tls, peer, &ingest, &stop).await,
                            Ok(Err(e)) => {
                                this.count(&ingest, "tls", 1);
                                tracing::info!(source = %this.name, %peer, error = %e, "a TLS handshake failed");
                            }
                            Err(_) => this.count(&ingest, "tls", 1),
                        }
                    }
                }
                drop(permit);
            });
            while conns.try_join_next().is_some() {}
        }
        conns.shutdown().await;
    }

    /// Reads one connection's frames; each batch is stored before more is read.
    async fn connection<S: tokio::io::AsyncRead + Unpin>(
        &self,
        mut stream: S,
        peer: SocketAddr,
        ingest: &Ingest,
        stop: &CancellationToken,
    ) {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let mut framer = Framer::new(self.max_frame);
        loop {
            let mut frames = Vec::new();
            while frames.len() < BATCH {
                match framer.next(&mut buf) {
                    Next::Frame(f) => frames.push(f),
                    Next::Oversized => self.count(ingest, "oversized", 1),
                    Next::More => break,
                }
            }
            if !frames.is_empty() {
                let refs: Vec<&[u8]> = frames
                    .iter()
                    .map(|f| trim_frame(f))
                    .filter(|f| !f.is_empty())
                    .collect();
                if !self.store(ingest, &refs, stop).await {
                    return;
                }
                continue;
            }
            let read = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(self.idle_timeout, stream.read_buf(&mut buf)) => r,
            };
            match read {
                Ok(Ok(0)) => {
                    // The last line of a sender that does not end it with a newline.
                    if let Some(f) = framer.rest(&mut buf) {
                        self.store(ingest, &[trim_frame(&f)], stop).await;
                    }
                    return;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(source = %self.name, %peer, error = %e, "tcp read failed");
                    return;
                }
                Err(_) => {
                    if !buf.is_empty() || framer.skipping() {
                        self.count(ingest, "stalled", 1);
                        tracing::info!(source = %self.name, %peer, "a client stopped mid-frame; its connection is closed");
                        return;
                    }
                }
            }
        }
    }

    /// Stores a batch of frames, waiting (and so not reading more) while the store refuses
    /// it; `false` when reflex stops first. The events are made again for a retry rather
    /// than copied for every first try.
    async fn store(&self, ingest: &Ingest, frames: &[&[u8]], stop: &CancellationToken) -> bool {
        let mut wait = Duration::from_millis(100);
        let mut first = true;
        loop {
            let events = self.events_counted(ingest, frames, first);
            first = false;
            if events.is_empty() {
                return true;
            }
            match ingest.submit(&self.name, events).await {
                Ok(_) => return true,
                Err(IngestError::Stopping) => return false,
                Err(e) => {
                    tracing::warn!(source = %self.name, error = %e, "syslog lines not stored yet; the connection waits");
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// A frame without its line ending.
fn trim_frame(f: &[u8]) -> &[u8] {
    let mut f = f;
    while let [rest @ .., b'\n' | b'\r' | 0] = f {
        f = rest;
    }
    f
}

/// What [`Framer::next`] found.
#[derive(Debug, PartialEq)]
enum Next {
    Frame(Vec<u8>),
    Oversized,
    More,
}

/// RFC 6587 framing of a TCP stream: octet counting (`LEN SP MSG`) when a frame starts
/// with a digit, else a line ending in LF. An oversized frame is skipped (its announced
/// length, or up to the next LF).
struct Framer {
    max: usize,
    /// Bytes of an oversized octet-counted frame still to skip.
    skip_bytes: usize,
    /// Skipping an oversized line up to its LF.
    skip_line: bool,
}

impl Framer {
    fn new(max: usize) -> Framer {
        Framer {
            max,
            skip_bytes: 0,
            skip_line: false,
        }
    }

    fn skipping(&self) -> bool {
        self.skip_bytes > 0 || self.skip_line
    }

    fn next(&mut self, buf: &mut BytesMut) -> Next {
        if self.skip_bytes > 0 {
            let n = self.skip_bytes.min(buf.len());
            buf.advance(n);
            self.skip_bytes -= n;
            if self.skip_bytes > 0 {
                return Next::More;
            }
        }
        if self.skip_line {
            match buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    buf.advance(i + 1);
                    self.skip_line = false;
                }
                None => {
                    buf.clear();
                    return Next::More;
                }
            }
        }
        if buf.is_empty() {
            return Next::More;
        }
        if buf[0].is_ascii_digit() {
            let Some(sp) = buf.iter().take(11).position(|&b| b == b' ') else {
                if buf.len() > 10 {
                    // Not a length: read it as a line instead.
                    return self.line(buf);
                }
                return Next::More;
            };
            let Some(len) = std::str::from_utf8(&buf[..sp])
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
            else {
                return self.line(buf);
            };
            if len > self.max {
                buf.advance(sp + 1);
                self.skip_bytes = len;
                return Next::Oversized;
            }
            if buf.len() < sp + 1 + len {
                return Next::More;
            }
            buf.advance(sp + 1);
            return Next::Frame(buf.split_to(len).to_vec());
        }
        self.line(buf)
    }

    fn line(&mut self, buf: &mut BytesMut) -> Next {
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) if i <= self.max => Next::Frame(buf.split_to(i + 1).to_vec()),
            Some(i) => {
                buf.advance(i + 1);
                Next::Oversized
            }
            None if buf.len() > self.max => {
                buf.clear();
                self.skip_line = true;
                Next::Oversized
            }
            None => Next::More,
        }
    }

    /// What is left at the end of the stream, as a last frame.
    fn rest(&mut self, buf: &mut BytesMut) -> Option<Vec<u8>> {
        if self.skipping() || buf.is_empty() || buf.len() > self.max {
            return None;
        }
        Some(buf.split().to_vec())
    }
}

/// The kernel's count of datagrams dropped on the UDP socket bound to `port` (the last
/// column of `/proc/net/udp` and `/proc/net/udp6`), where Linux tells.
fn udp_drops(port: u16) -> Option<u64> {
    let want = format!(":{port:04X}");
    let mut total = None;
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.get(1).is_some_and(|local| local.ends_with(&want)) {
                if let Some(d) = cols.last().and_then(|d| d.parse::<u64>().ok()) {
                    *total.get_or_insert(0) += d;
                }
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(max: usize, input: &[&[u8]]) -> Vec<Next> {
        let mut f = Framer::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in input {
            buf.extend_from_slice(chunk);
            loop {
                match f.next(&mut buf) {
                    Next::More => break,
                    n => out.push(n),
                }
            }
        }
        out
    }

    fn frame(s: &str) -> Next {
        Next::Frame(s.as_bytes().to_vec())
    }

    #[test]
    fn newline_and_octet_counting_frames_in_any_chunks() {
        let got = frames(
            64,
            &[b"<13>a\n<1", b"4>b\n10 <13>c\nd e\n", b"5 <13>", b"x"],
        );
        assert_eq!(
            got,
            vec![
                frame("<13>a\n"),
                frame("<14>b\n"),
                frame("<13>c\nd e\n"),
                frame("<13>x")
            ]
        );
    }

    #[test]
    fn oversized_frames_are_skipped_and_the_stream_goes_on() {
        let long = vec![b'x'; 100];
        let got = frames(16, &[&long, b"\n<13>ok\n", b"100 ", &long, b"<13>next\n"]);
        assert_eq!(
            got,
            vec![
                Next::Oversized,
                frame("<13>ok\n"),
                Next::Oversized,
                frame("<13>next\n")
            ]
        );
    }

    #[test]
    fn a_line_that_starts_with_digits_is_still_a_line() {
        let got = frames(64, &[b"2026-11-30 something happened\n"]);
        assert_eq!(got, vec![frame("2026-11-30 something happened\n")]);
    }
}
