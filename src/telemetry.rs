//! Logs and metrics with a fixed vocabulary: every metric name and label is defined here.

use crate::config::{LogConfig, LogFormat};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, String)>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 20))
}

/// Every metric reflex exports.
pub struct Metrics {
    registry: Registry,
    events_received: Family<Labels, Counter>,
    events_rejected: Family<Labels, Counter>,
    events_duplicate: Family<Labels, Counter>,
    deliveries: Family<Labels, Counter>,
    delivery_latency: Family<Labels, Histogram, fn() -> Histogram>,
    expression_errors: Family<Labels, Counter>,
    guard_rails: Family<Labels, Counter>,
    source_up: Family<Labels, Gauge>,
    source_stalls: Family<Labels, Counter>,
    vcenter_missed: Family<Labels, Counter>,
    vcenter_lag: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Deliveries waiting or running in the dispatcher.
    pub queue_depth: Gauge,
    /// Events accepted but not yet durable.
    pub ingest_in_flight: Gauge,
    /// Database size.
    pub store_bytes: Gauge<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("reflex");
        let m = Metrics {
            events_received: Family::default(),
            events_rejected: Family::default(),
            events_duplicate: Family::default(),
            deliveries: Family::default(),
            delivery_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            expression_errors: Family::default(),
            guard_rails: Family::default(),
            source_up: Family::default(),
            source_stalls: Family::default(),
            vcenter_missed: Family::default(),
            vcenter_lag: Family::default(),
            queue_depth: Gauge::default(),
            ingest_in_flight: Gauge::default(),
            store_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events_received",
            "Events accepted and made durable, by source",
            m.events_received.clone(),
        );
        registry.register(
            "guard_rail_decisions",
            "Guard-rail decisions, by trigger, guard rail (dry_run, protect, blast_radius, pause, approval, loop_guard, chain_depth, verify, budget) and decision",
            m.guard_rails.clone(),
        );
        registry.register(
            "events_rejected",
            "Requests or events refused, by source and reason",
            m.events_rejected.clone(),
        );
        registry.register(
            "events_duplicate",
            "Events absorbed by dedup, by source",
            m.events_duplicate.clone(),
        );
        registry.register(
            "deliveries",
            "Delivery attempts' outcomes by trigger (succeeded, retrying, dead, throttled)",
            m.deliveries.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "From the event's receipt to its delivery's success, by trigger",
            m.delivery_latency.clone(),
        );
        registry.register(
            "expression_errors",
            "Trigger expressions or key templates that failed on an event",
            m.expression_errors.clone(),
        );
        registry.register(
            "source_up",
            "1 when a polling source's last poll succeeded",
            m.source_up.clone(),
        );
        registry.register(
            "source_stalls",
            "Times a polling source was announced as stalled",
            m.source_stalls.clone(),
        );
        registry.register(
            "vcenter_events_missed",
            "vCenter events that fell out of the page between two polls",
            m.vcenter_missed.clone(),
        );
        registry.register(
            "vcenter_lag_seconds",
            "vCenter's clock minus the time of the last event read",
            m.vcenter_lag.clone(),
        );
        registry.register(
            "queue_depth",
            "Deliveries held in memory (waiting, scheduled or running); past store.deliveries_in_memory the rest wait in the store",
            m.queue_depth.clone(),
        );
        registry.register(
            "ingest_in_flight",
            "Events received and not yet durable",
            m.ingest_in_flight.clone(),
        );
        registry.register(
            "store_size_bytes",
            "Size of the embedded store's files",
            m.store_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// An event was accepted.
    pub fn event_received(&self, source: &str, n: u64) {
        self.events_received
            .get_or_create(&vec![("source", source.to_string())])
            .inc_by(n);
    }
    /// A request or event was refused.
    pub fn event_rejected(&self, source: &str, reason: &str) {
        self.events_rejected_n(source, reason, 1);
    }
    /// `n` events were refused or dropped for one reason (a syslog batch, UDP overruns).
    pub fn events_rejected_n(&self, source: &str, reason: &str, n: u64) {
        self.events_rejected
            .get_or_create(&vec![
                ("source", source.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc_by(n);
    }
    /// A duplicate was absorbed.
    pub fn event_duplicate(&self, source: &str) {
        self.events_duplicate
            .get_or_create(&vec![("source", source.to_string())])
            .inc();
    }
    /// A delivery reached `outcome`.
    pub fn delivery(&self, trigger: &str, outcome: &str) {
        self.deliveries
            .get_or_create(&vec![
                ("trigger", trigger.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
    }
    /// A delivery succeeded `secs` after its event arrived.
    pub fn delivery_latency(&self, trigger: &str, secs: f64) {
        self.delivery_latency
            .get_or_create(&vec![("trigger", trigger.to_string())])
            .observe(secs);
    }
    /// A guard rail decided (`guard`: which one; `decision`: what it did).
    pub fn guard_rail(&self, trigger: &str, guard: &str, decision: &str) {
        self.guard_rails
            .get_or_create(&vec![
                ("trigger", trigger.to_string()),
                ("guard", guard.to_string()),
                ("decision", decision.to_string()),
            ])
            .inc();
    }
    /// An expression failed.
    pub fn expression_error(&self, trigger: &str) {
        self.expression_errors
            .get_or_create(&vec![("trigger", trigger.to_string())])
            .inc();
    }

    /// A polling source's health.
    pub fn source_up(&self, source: &str, up: bool) {
        self.source_up
            .get_or_create(&vec![("source", source.to_string())])
            .set(up as i64);
    }
    /// A polling source was announced as stalled.
    pub fn source_stalled(&self, source: &str) {
        self.source_stalls
            .get_or_create(&vec![("source", source.to_string())])
            .inc();
    }
    /// Events that could not be read because more than a page arrived between polls.
    pub fn vcenter_missed(&self, source: &str, n: u64) {
        self.vcenter_missed
            .get_or_create(&vec![("source", source.to_string())])
            .inc_by(n);
    }
    /// The event stream's lag.
    pub fn vcenter_lag(&self, source: &str, secs: f64) {
        self.vcenter_lag
            .get_or_create(&vec![("source", source.to_string())])
            .set(secs);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        encode(&mut s, &self.registry).expect("writing to a String cannot fail");
        s
    }

    /// The metrics in the Prometheus text format 0.0.4, for scrapers and tools (such as
    /// `promtool check metrics`) that do not ask for OpenMetrics: a counter's `HELP` and
    /// `TYPE` name its samples (`…_total`), and there is no `# EOF`.
    pub fn render_text(&self) -> String {
        to_prometheus_text(&self.render())
    }
}

/// Starts logging; `RUST_LOG` overrides the configured level.
pub fn init_logging(cfg: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(Redacting(std::io::stderr));
    let _ = match cfg.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Log output with every configured secret value masked, whatever line it is in (a secret
/// inside a URL in a driver's error, say): the last guard behind the masking done where
/// records and answers are made.
#[derive(Clone, Copy)]
pub struct Redacting<M>(pub M);

impl<'a, M> tracing_subscriber::fmt::MakeWriter<'a> for Redacting<M>
where
    M: tracing_subscriber::fmt::MakeWriter<'a>,
{
    type Writer = RedactingWriter<M::Writer>;
    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter(self.0.make_writer())
    }
}

/// One log line's writer for [`Redacting`]: the formatter writes each event whole, so a
/// secret is never split across two writes.
pub struct RedactingWriter<W>(W);

impl<W: std::io::Write> std::io::Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        match crate::config::secret::redact(&text) {
            std::borrow::Cow::Borrowed(_) => self.0.write_all(buf)?,
            std::borrow::Cow::Owned(masked) => self.0.write_all(masked.as_bytes())?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Rewrites an OpenMetrics exposition as Prometheus text 0.0.4 (see [`Metrics::render_text`]).
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {

    /// A secret in any log line (here a URL field no code path masked) reaches the log
    /// masked, in the text and the JSON format.
    #[test]
    fn log_lines_mask_secret_values() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _secret = crate::config::Secret::new("hunter2-log-secret");
        for json in [false, true] {
            let buf = Buf::default();
            let out = buf.clone();
            let builder = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(Redacting(move || out.clone()));
            let dispatch: tracing::Dispatch = if json {
                builder.json().finish().into()
            } else {
                builder.finish().into()
            };
            tracing::dispatcher::with_default(&dispatch, || {
                tracing::warn!(
                    url = "https://hooks.example.com/hunter2-log-secret/x",
                    "cannot post"
                );
                tracing::warn!("error sending request for url (https://x/?t=hunter2-log-secret)");
            });
            let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            assert!(text.contains("cannot post"), "{text}");
            assert_eq!(text.matches("<redacted>").count(), 2, "{text}");
            assert!(!text.contains("hunter2"), "{text}");
        }
    }

    use super::*;

    /// Checks what `promtool check metrics` checks of the text format: every sample's
    /// family has `HELP` and `TYPE` under the name the format expects, declared once,
    /// before its samples. Returns the problems.
    fn text_format_problems(text: &str) -> Vec<String> {
        let mut help = std::collections::HashSet::new();
        let mut types = std::collections::HashMap::new();
        let mut problems = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or("");
                if !help.insert(name.to_string()) {
                    problems.push(format!("second HELP for {name}"));
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
                types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                problems.push(format!("unexpected line {line:?}"));
                continue;
            }
            let sample = line.split(['{', ' ']).next().unwrap_or("");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    let base = sample.strip_suffix(s)?;
                    (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
                })
                .unwrap_or(sample);
            if !help.contains(family) {
                problems.push(format!("no help text for {sample}"));
            }
            match types.get(family).map(String::as_str) {
                None => problems.push(format!("no type for {sample}")),
                Some("counter") if !sample.ends_with("_total") => {
                    problems.push(format!("counter {sample} does not end in _total"))
                }
                _ => {}
            }
        }
        problems
    }

    #[test]
    fn the_text_format_has_help_and_type_for_every_sample() {
        let m = Metrics::new();
        m.event_received("hook", 3);
        m.event_rejected("hook", "auth");
        m.delivery("t", "succeeded");
        m.delivery_latency("t", 0.2);
        m.queue_depth.set(4);
        // What the OpenMetrics exposition gives a text-format parser:
        let open = m.render();
        assert!(!text_format_problems(&open).is_empty());
        let text = m.render_text();
        assert_eq!(text_format_problems(&text), Vec::<String>::new(), "{text}");
        assert!(text.contains("# HELP reflex_deliveries_total "), "{text}");
        assert!(
            text.contains("reflex_delivery_latency_seconds_bucket{"),
            "{text}"
        );
    }
}
