//! The router: triggers compiled from the configuration. Exact `type` filters are indexed so
//! that matching an event costs a hash lookup plus the triggers that cannot be indexed.

mod filter;
mod index;

pub use filter::CompiledFilter;

use crate::actions::Action;
use crate::config::{Config, Diagnostics, TriggerConfig};
use crate::template::Template;
use cloudevents::Event;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// How deliveries of one trigger are attempted.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// When retries are due.
    pub retry: crate::deliveries::RetrySchedule,
    /// Time allowed per attempt.
    pub timeout: Duration,
    /// Attempts running at once.
    pub concurrency: usize,
    /// Least time between two attempt starts (from `rate`).
    pub spacing: Option<Duration>,
    /// Key template for one-at-a-time, in-order delivery.
    pub ordering_key: Option<Template>,
    /// Key template and window for `once_within` throttling.
    pub throttle: Option<(Template, Duration)>,
    /// Its action only says what it would do (`dry_run`, or `deliveries.dry_run`).
    pub dry_run: bool,
    /// At most this many changes within this window, then the trigger pauses.
    pub blast_radius: Option<(u64, Duration)>,
    /// It counts toward `deliveries.blast_radius` (its action may change something), and
    /// waits while that pause (`*`) holds.
    pub global_radius: Option<(u64, Duration)>,
    /// Its action waits for an approval, up to this long.
    pub approval: Option<Duration>,
    /// Key template, count and window of its correlation.
    pub correlate: Option<(Template, u32, Duration)>,
}

/// A compiled trigger.
pub struct Trigger {
    /// Its name.
    pub name: String,
    filters: Vec<CompiledFilter>,
    when: Option<(String, cel::Program)>,
    /// The action it runs.
    pub action: Action,
    /// Its delivery policy.
    pub policy: DeliveryPolicy,
    /// Fires on events reflex's own vSphere changes caused too.
    pub own_effects: bool,
    /// What it matches, as an operator reads it (filters and `when`), for the console.
    pub matches: String,
}

impl Trigger {
    /// The AMQP topic binding keys of this trigger's queue: every event it can match has a
    /// type these keys route (`#` when its filters do not narrow the type).
    pub fn type_bindings(&self) -> Vec<String> {
        self.filters
            .iter()
            .find_map(|f| f.type_bindings())
            .unwrap_or_else(|| vec!["#".into()])
    }
}

/// The extension the vcenter source sets on an event caused by reflex's own vSphere session
/// (the loop guard): triggers do not fire on it unless they set `own_effects: true`.
pub const REFLEX_CAUSED: &str = "reflexcaused";

/// One (event, trigger) match, ready to become a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// Index of the trigger in [`Router::triggers`].
    pub trigger: usize,
    /// Rendered ordering key.
    pub ordering_key: Option<String>,
    /// Rendered throttle key and window.
    pub throttle: Option<(String, Duration)>,
    /// Rendered correlation.
    pub correlate: Option<crate::store::Correlate>,
}

/// All triggers, with the index that finds an event's candidates.
pub struct Router {
    /// Triggers in configuration order.
    pub triggers: Vec<Trigger>,
    index: index::Index,
}

impl Router {
    /// Compiles every trigger, recording every problem in `diags`.
    pub fn build(config: &Config, diags: &mut Diagnostics) -> Router {
        let mut triggers = Vec::new();
        for t in &config.triggers {
            if let Some(trig) = compile_trigger(t, config, diags) {
                triggers.push(trig);
            }
        }
        Router::from_triggers(triggers)
    }

    fn from_triggers(triggers: Vec<Trigger>) -> Router {
        let index = index::Index::build(triggers.iter().map(|t| t.filters.as_slice()));
        Router { triggers, index }
    }

    /// The triggers counted by `deliveries.blast_radius`.
    pub fn changing(&self) -> Vec<String> {
        self.triggers
            .iter()
            .filter(|t| t.policy.global_radius.is_some())
            .map(|t| t.name.clone())
            .collect()
    }

    /// Index of a trigger by name.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.triggers.iter().position(|t| t.name == name)
    }

    /// The triggers an event matches, in configuration order. An expression that fails to
    /// evaluate counts as no match and is reported in `errors`.
    pub fn route(&self, event: &Event, errors: &mut Vec<String>) -> Vec<Match> {
        self.route_noting(event, errors, &mut Vec::new())
    }

    /// [`Router::route`], also noting the triggers the loop guard kept from firing on an
    /// event reflex's own change caused (`loop_guarded`).
    pub fn route_noting(
        &self,
        event: &Event,
        errors: &mut Vec<String>,
        loop_guarded: &mut Vec<usize>,
    ) -> Vec<Match> {
        let candidates = self.index.candidates(event);
        let mut view = None;
        // The template context, converted once per event and shared by the key templates.
        let mut tpl_ctx: Option<minijinja::Value> = None;
        let mut out = Vec::new();
        for i in candidates {
            let t = &self.triggers[i];
            if !t.filters.iter().all(|f| f.matches(event)) {
                continue;
            }
            if !t.own_effects
                && crate::event::attribute(event, REFLEX_CAUSED).as_deref() == Some("true")
            {
                loop_guarded.push(i);
                continue;
            }
            let keyed = t.policy.ordering_key.is_some()
                || t.policy.throttle.is_some()
                || t.policy.correlate.is_some();
            let needs_view = t.when.is_some() || keyed;
            if needs_view && view.is_none() {
                view = Some(json!({ "event": crate::event::view(event) }));
            }
            let ctx = view.as_ref();
            if let Some((src, program)) = &t.when {
                match eval_when(program, &ctx.expect("view built")["event"]) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        errors.push(format!(
                            "trigger `{}`: expression `{src}` failed: {e}",
                            t.name
                        ));
                        continue;
                    }
                }
            }
            if keyed && tpl_ctx.is_none() {
                tpl_ctx = Some(Template::context(ctx.expect("view built")));
            }
            let render = |tpl: &Template| -> Result<String, String> {
                tpl.render_value(tpl_ctx.as_ref().expect("context built"))
            };
            let ordering_key = match t.policy.ordering_key.as_ref().map(render).transpose() {
                Ok(k) => k,
                Err(e) => {
                    errors.push(format!("trigger `{}`: ordering_key: {e}", t.name));
                    continue;
                }
            };
            let throttle = match &t.policy.throttle {
                Some((tpl, window)) => match render(tpl) {
                    Ok(k) => Some((k, *window)),
                    Err(e) => {
                        errors.push(format!("trigger `{}`: throttle.key: {e}", t.name));
                        continue;
                    }
                },
                None => None,
            };
            let correlate = match &t.policy.correlate {
                Some((tpl, count, within)) => match render(tpl) {
                    Ok(key) => Some(crate::store::Correlate {
                        key,
                        count: *count,
                        within: *within,
                    }),
                    Err(e) => {
                        errors.push(format!("trigger `{}`: correlate.key: {e}", t.name));
                        continue;
                    }
                },
                None => None,
            };
            out.push(Match {
                trigger: i,
                ordering_key,
                throttle,
                correlate,
            });
        }
        out
    }
}

fn eval_when(program: &cel::Program, event: &serde_json::Value) -> Result<bool, String> {
    let mut ctx = cel::Context::default();
    let value = cel::to_value(event).map_err(|e| e.to_string())?;
    ctx.add_variable_from_value("event", value);
    match program.execute(&ctx) {
        Ok(cel::Value::Bool(b)) => Ok(b),
        Ok(other) => Err(format!("expected a boolean, got {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn compile_trigger(t: &TriggerConfig, config: &Config, diags: &mut Diagnostics) -> Option<Trigger> {
    let loc = &t.name.referenced;
    let name = &t.name.value;
    let mut ok = true;
    let mut filters = Vec::new();
    for f in &t.filters {
        match CompiledFilter::compile(f) {
            Ok(c) => filters.push(c),
            Err(e) => {
                diags.at(loc, format!("trigger `{name}`: {e}"));
                ok = false;
            }
        }
    }
    let when = match &t.when {
        Some(w) => match cel::Program::compile(&w.value) {
            Ok(p) => Some((w.value.clone(), p)),
            Err(e) => {
                diags.at(
                    &w.referenced,
                    format!(
                        "trigger `{name}`: invalid CEL expression `{}`: {e}",
                        w.value
                    ),
                );
                ok = false;
                None
            }
        },
        None => None,
    };
    let mut template = |text: &crate::config::Text, what: &str| match Template::compile(&text.value)
    {
        Ok(t) => Some(t),
        Err(e) => {
            diags.at(&text.referenced, format!("trigger `{name}`: {what}: {e}"));
            ok = false;
            None
        }
    };
    let d = &t.delivery;
    let ordering_key = d
        .ordering_key
        .as_ref()
        .and_then(|k| template(k, "delivery.ordering_key"));
    let throttle = d.throttle.as_ref().and_then(|th| {
        template(&th.key, "delivery.throttle.key").map(|tpl| (tpl, th.once_within.0))
    });
    let correlate = t
        .correlate
        .as_ref()
        .and_then(|c| template(&c.key, "correlate.key").map(|k| (k, c.count, c.within.0)));
    if let Some(c) = &t.correlate {
        if c.count < 2 {
            diags.at(
                &c.key.referenced,
                format!("trigger `{name}`: correlate.count must be at least 2 (one event needs no correlation)"),
            );
            ok = false;
        }
        if c.within.0.is_zero() {
            diags.at(
                &c.key.referenced,
                format!("trigger `{name}`: correlate.within must be longer than 0s"),
            );
            ok = false;
        }
    }
    let action = Action::build(&t.action, name, config, loc, diags);
    let policy = DeliveryPolicy {
        max_attempts: d.max_attempts.max(1),
        retry: crate::deliveries::RetrySchedule {
            delays: d.delays.iter().map(|d| d.0).collect(),
            backoff: d.backoff.0,
            max_backoff: d.max_backoff.0,
            jitter: d.jitter.clamp(0.0, 1.0),
            max_retry_after: d.max_retry_after.0,
            min_after_429: d.min_backoff_after_429.0,
        },
        timeout: d
            .timeout
            .map(|t| t.0)
            .unwrap_or_else(|| t.action.default_timeout()),
        // A trigger with a blast radius makes one change at a time (per node), so that each
        // is counted before the next starts.
        concurrency: if t.blast_radius.is_some() {
            1
        } else {
            d.concurrency.max(1)
        },
        spacing: d.rate.map(|r| r.interval()),
        ordering_key,
        throttle,
        dry_run: t.dry_run || config.deliveries.dry_run,
        blast_radius: t.blast_radius.map(|b| (u64::from(b.max), b.within.0)),
        global_radius: config
            .deliveries
            .blast_radius
            .filter(|_| t.action.may_change())
            .map(|b| (u64::from(b.max), b.within.0)),
        approval: t.approval.map(|a| a.timeout),
        correlate,
    };
    if t.correlate.is_some() && d.throttle.is_some() {
        diags.at(
            loc,
            format!("trigger `{name}`: correlate and delivery.throttle cannot go together: both hold events back by key; keep one"),
        );
        ok = false;
    }
    if t.approval.is_some() && d.ordering_key.is_some() {
        diags.at(
            loc,
            format!("trigger `{name}`: approval and delivery.ordering_key cannot go together: a delivery waiting for a person would hold every later event of its key; drop one of them"),
        );
        ok = false;
    }
    match (ok, action) {
        (true, Some(action)) => Some(Trigger {
            name: name.clone(),
            matches: {
                let mut parts: Vec<String> = t.filters.iter().map(|f| f.to_string()).collect();
                if let Some((src, _)) = &when {
                    parts.push(format!("when {src}"));
                }
                if parts.is_empty() {
                    "every event".into()
                } else {
                    parts.join("; ")
                }
            },
            filters,
            when,
            action,
            policy,
            own_effects: t.own_effects,
        }),
        _ => None,
    }
}

/// Shared handle to the router.
pub type SharedRouter = Arc<Router>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use cloudevents::{EventBuilder, EventBuilderV10};

    fn router(yaml: &str) -> Router {
        let cfg = config::parse("t.yaml", yaml).unwrap();
        let mut d = Diagnostics::default();
        let r = Router::build(&cfg, &mut d);
        assert!(d.0.is_empty(), "{:?}", d.0);
        r
    }

    fn ev(ty: &str, subject: &str, data: serde_json::Value) -> Event {
        EventBuilderV10::new()
            .id("1")
            .source("/t")
            .ty(ty)
            .subject(subject)
            .data("application/json", data)
            .build()
            .unwrap()
    }

    /// Prefix filters on `type` are found through the prefix index, together with exact
    /// and unindexed triggers, in configuration order; a prefix is only a candidate, the
    /// trigger's other filters still decide.
    #[test]
    fn prefix_triggers_are_indexed_and_keep_their_order() {
        let r = router(
            r#"
triggers:
  - {name: t0, filters: [{prefix: {type: com.a}}], action: {type: http, url: "http://x/"}}
  - {name: t1, filters: [{exact: {type: com.a.b}}], action: {type: http, url: "http://x/"}}
  - {name: t2, filters: [{prefix: {type: com.}}], action: {type: http, url: "http://x/"}}
  - {name: t3, filters: [{prefix: {subject: vm-}}], action: {type: http, url: "http://x/"}}
  - {name: t4, filters: [{prefix: {type: com.a.b.c.d}}], action: {type: http, url: "http://x/"}}
  - {name: t5, filters: [{prefix: {type: com.a}}, {exact: {subject: other}}], action: {type: http, url: "http://x/"}}
  - {name: t6, filters: [{prefix: {type: "é"}}], action: {type: http, url: "http://x/"}}
  - {name: t7, filters: [{prefix: {type: com.a.b}}], action: {type: http, url: "http://x/"}}
"#,
        );
        let names = |ty: &str| {
            r.route(&ev(ty, "vm-1", json!({})), &mut Vec::new())
                .iter()
                .map(|m| r.triggers[m.trigger].name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("com.a.b"), ["t0", "t1", "t2", "t3", "t7"]);
        assert_eq!(names("com.a"), ["t0", "t2", "t3"]);
        assert_eq!(names("éa"), ["t3", "t6"]);
        assert_eq!(names("c"), ["t3"]);
    }

    /// The index returns what a scan of every trigger would: random triggers (exact,
    /// prefix and suffix filters on type and subject, alone, combined, negated or in `any`)
    /// against random events.
    #[test]
    fn indexed_matching_equals_a_linear_scan() {
        use cloudevents::AttributesReader;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let word = |rng: &mut rand::rngs::StdRng| {
            let parts = ["a", "b", "ab", "com", "vm", "é", "x.y"];
            let n = rng.random_range(1..4);
            (0..n)
                .map(|_| parts[rng.random_range(0..parts.len())])
                .collect::<Vec<_>>()
                .join(".")
        };
        let mut yaml = String::from("triggers:\n");
        for i in 0..2_000 {
            let f = match rng.random_range(0..9) {
                0 => format!("{{exact: {{type: \"{}\"}}}}", word(&mut rng)),
                1 => format!("{{prefix: {{type: \"{}\"}}}}", word(&mut rng)),
                2 => format!("{{prefix: {{subject: \"{}\"}}}}", word(&mut rng)),
                5 => format!("{{suffix: {{type: \"{}\"}}}}", word(&mut rng)),
                6 => format!("{{exact: {{subject: \"{}\"}}}}", word(&mut rng)),
                7 => format!(
                    "{{suffix: {{subject: \"{}\", type: \"{}\"}}}}",
                    word(&mut rng),
                    word(&mut rng)
                ),
                8 => format!(
                    "{{any: [{{prefix: {{type: \"{}\"}}}}, {{exact: {{source: /t}}}}]}}",
                    word(&mut rng)
                ),
                3 => format!(
                    "{{prefix: {{type: \"{}\"}}}}, {{exact: {{subject: \"{}\"}}}}",
                    word(&mut rng),
                    word(&mut rng)
                ),
                _ => format!("{{not: {{prefix: {{type: \"{}\"}}}}}}", word(&mut rng)),
            };
            yaml.push_str(&format!(
                "  - {{name: t{i}, filters: [{f}], action: {{type: http, url: \"http://x/\"}}}}\n"
            ));
        }
        let r = router(&yaml);
        for _ in 0..2_000 {
            let e = ev(&word(&mut rng), &word(&mut rng), json!({}));
            let indexed: Vec<usize> = r
                .route(&e, &mut Vec::new())
                .iter()
                .map(|m| m.trigger)
                .collect();
            let scanned: Vec<usize> = r
                .triggers
                .iter()
                .enumerate()
                .filter(|(_, t)| t.filters.iter().all(|f| f.matches(&e)))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(
                indexed,
                scanned,
                "type {:?} subject {:?}",
                e.ty(),
                e.subject()
            );
        }
    }

    #[test]
    fn ten_thousand_prefix_triggers_each_find_their_events() {
        let mut yaml = String::from("triggers:\n");
        for i in 0..10_000 {
            yaml.push_str(&format!(
                "  - {{name: t{i}, filters: [{{prefix: {{type: \"p.{i}.\"}}}}], action: {{type: http, url: \"http://x/\"}}}}\n"
            ));
        }
        let r = router(&yaml);
        for i in [0, 4, 42, 9_999] {
            let got: Vec<usize> = r
                .route(&ev(&format!("p.{i}.x"), "s", json!({})), &mut Vec::new())
                .iter()
                .map(|m| m.trigger)
                .collect();
            assert_eq!(got, [i]);
        }
        assert!(r
            .route(&ev("p.10000.x", "s", json!({})), &mut Vec::new())
            .is_empty());
    }

    #[test]
    fn exact_index_and_expression() {
        let r = router(
            r#"
triggers:
  - name: a
    filters: [{exact: {type: alarm}}]
    when: 'event.data.status == "red"'
    action: {type: emit, event_type: x}
  - name: b
    filters: [{prefix: {subject: vm-}}]
    action: {type: emit, event_type: x}
  - name: c
    filters: [{exact: {type: other}}]
    action: {type: emit, event_type: x}
"#,
        );
        let mut errs = vec![];
        let m: Vec<_> = r
            .route(&ev("alarm", "vm-1", json!({"status": "red"})), &mut errs)
            .into_iter()
            .map(|m| m.trigger)
            .collect();
        assert_eq!(m, vec![0, 1]);
        let m: Vec<_> = r
            .route(
                &ev("alarm", "host-1", json!({"status": "green"})),
                &mut errs,
            )
            .into_iter()
            .map(|m| m.trigger)
            .collect();
        assert!(m.is_empty());
        let m: Vec<_> = r
            .route(&ev("other", "x", json!({})), &mut errs)
            .into_iter()
            .map(|m| m.trigger)
            .collect();
        assert_eq!(m, vec![2]);
        assert!(errs.is_empty());
    }

    #[test]
    fn expression_errors_are_reported_not_matched() {
        let r = router(
            r#"
triggers:
  - name: a
    when: 'event.data.count > 3'
    action: {type: emit, event_type: x}
"#,
        );
        let mut errs = vec![];
        assert!(r
            .route(&ev("t", "s", json!({"count": "many"})), &mut errs)
            .is_empty());
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(r.route(&ev("t", "s", json!({"count": 4})), &mut errs).len() == 1);
    }

    #[test]
    fn keys_are_rendered() {
        let r = router(
            r#"
triggers:
  - name: a
    action: {type: emit, event_type: x}
    delivery:
      ordering_key: "{{ event.subject }}"
      throttle: {key: "vm/{{ event.data.vm }}", once_within: 10m}
"#,
        );
        let m = r.route(&ev("t", "s1", json!({"vm": "web"})), &mut vec![]);
        assert_eq!(m[0].ordering_key.as_deref(), Some("s1"));
        assert_eq!(
            m[0].throttle,
            Some(("vm/web".to_string(), Duration::from_secs(600)))
        );
    }

    #[test]
    fn the_retry_schedule_comes_from_the_delivery_settings() {
        let r = router(
            r#"
triggers:
  - name: a
    filters: [{exact: {type: alarm}}]
    action: {type: emit, event_type: x}
    delivery: {delays: [10s, 1m], max_backoff: 30s, jitter: 0, max_retry_after: 2m, min_backoff_after_429: 7s}
  - name: b
    filters: [{exact: {type: alarm}}]
    action: {type: emit, event_type: x}
"#,
        );
        let s = |d: u64| Duration::from_secs(d);
        let a = &r.triggers[0].policy.retry;
        assert_eq!(a.delays, vec![s(10), s(60)]);
        assert_eq!(
            (a.max_backoff, a.jitter, a.max_retry_after, a.min_after_429),
            (s(30), 0.0, s(120), s(7))
        );
        let e = crate::actions::ActionError::transient("x");
        // The list is capped by max_backoff.
        assert_eq!(a.delay(3, &e, 0.5), s(30));
        assert_eq!(
            r.triggers[1].policy.retry,
            crate::deliveries::RetrySchedule::default()
        );
    }
}
