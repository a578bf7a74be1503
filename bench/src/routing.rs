//! Matching alone: events of varied types through the router with 10 and with 10,000
//! `prefix` triggers on `type`, none matching (the (g) without HTTP), and 10,000
//! `suffix` triggers.

use cloudevents::{EventBuilder, EventBuilderV10};
use std::time::{Duration, Instant};

fn router(n: usize, kind: &str) -> anyhow::Result<reflex::router::Router> {
    let mut yaml = String::from("triggers:\n");
    for i in 0..n {
        yaml.push_str(&format!(
            "  - {{name: t{i}, filters: [{{{kind}: {{type: \"nomatch.{i}.\"}}}}], action: {{type: http, url: \"http://127.0.0.1:1/\"}}}}\n"
        ));
    }
    let config = reflex::config::parse("bench.yaml", &yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut diags = reflex::config::Diagnostics::default();
    let r = reflex::router::Router::build(&config, &mut diags);
    anyhow::ensure!(diags.0.is_empty(), "{:?}", diags.0);
    Ok(r)
}

/// Events routed per second for `secs`.
fn rate(r: &reflex::router::Router, secs: u64) -> f64 {
    let events: Vec<_> = (0..512)
        .map(|i| {
            EventBuilderV10::new()
                .id(i.to_string())
                .source("/bench")
                .ty(format!("alert.bench.host-{i:03}.disk_full"))
                .subject(format!("vm-{i}"))
                .build()
                .expect("a valid event")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut n = 0u64;
    let mut errors = Vec::new();
    while Instant::now() < deadline {
        for e in &events {
            assert!(r.route(e, &mut errors).is_empty());
        }
        n += events.len() as u64;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The report's rows.
pub fn run(secs: u64) -> anyhow::Result<String> {
    let few = rate(&router(10, "prefix")?, secs);
    let many = rate(&router(10_000, "prefix")?, secs);
    let scanned = rate(&router(10_000, "suffix")?, secs);
    Ok(format!(
        "| (g′) matching alone, 10,000 `prefix` triggers on `type`, none matching | {many:.0} events/s | 10 `prefix` triggers: {few:.0} events/s (10,000 `suffix` triggers: {scanned:.0}) | {:.2} | flat |\n",
        many / few
    ))
}
