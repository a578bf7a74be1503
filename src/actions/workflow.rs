//! `type: workflow` — ordered steps, each an action of any kind, in one delivery.
//!
//! A step may have a `when` (CEL over `event` and `steps`), its own tries and timeout, and
//! sees the earlier steps' results in its templates as `steps.NAME.status` (`succeeded`,
//! `skipped`, `failed`), `steps.NAME.output` (what the action read or answered, e.g. an
//! `http_request`'s JSON reply), `steps.NAME.detail` and `steps.NAME.error`.
//!
//! Each step's result is kept in the attempt's record. A failed attempt's record ends with
//! the results so far (`[workflow {...}]`), and the delivery's next attempt, on any node,
//! resumes after the last step that succeeded: a step that succeeded is not run again
//! because a later one failed. When a step fails for good (a permanent failure, or the
//! delivery's last attempt), the `on_failure` steps run, with the failed step's `error`.

use super::{ActionConfig, ActionContext, ActionError, Outcome, ATTEMPT, STEPS};
use crate::config::{Config, Diagnostics};
use cloudevents::Event;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use serde_saphyr::Location;
use std::time::Duration;

/// Configuration of `type: workflow`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowConfig {
    /// The steps, run in order.
    pub steps: Vec<StepConfig>,
    /// Steps run when a step fails for good (permanently, or on the delivery's last
    /// attempt); they see `steps.NAME.error` of the step that failed.
    #[serde(default)]
    pub on_failure: Vec<StepConfig>,
}

/// One step of a workflow.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// Its name, unique in the workflow (letters, digits, `_`): `steps.NAME` in templates.
    pub name: String,
    /// Run the step only when this CEL condition over `event` and `steps` holds.
    pub when: Option<String>,
    /// What the step does: an action of any kind but `workflow`.
    pub action: Box<ActionConfig>,
    /// Tries of the step within one attempt of the delivery (default 1).
    #[serde(default = "one")]
    pub max_attempts: u32,
    /// The wait after a failed try, doubled after each (default 1s).
    #[serde(default)]
    pub backoff: Option<crate::config::Duration>,
    /// Time allowed for one try (the delivery's `timeout` bounds the whole workflow).
    #[serde(default)]
    pub timeout: Option<crate::config::Duration>,
    /// Its output holds a secret (a token): it is never kept in a record, and a retried
    /// delivery runs this step again rather than resuming after it.
    #[serde(default)]
    pub sensitive: bool,
    /// This step only says what it would do (vSphere steps read the current state);
    /// nothing is changed. A trigger in dry run runs every step so.
    #[serde(default)]
    pub dry_run: bool,
    /// The step waits for a person to approve its plan (its dry run, shown with the
    /// approval); rejected or not decided in time, the workflow stops there.
    pub approval: Option<crate::config::ApprovalConfig>,
}

fn one() -> u32 {
    1
}

/// A compiled step.
struct Step {
    name: String,
    when: Option<(String, cel::Program)>,
    action: super::Action,
    max_attempts: u32,
    backoff: Duration,
    timeout: Option<Duration>,
    sensitive: bool,
    dry_run: bool,
    approval: Option<Duration>,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("when", &self.when.as_ref().map(|w| &w.0))
            .field("action", &self.action)
            .finish()
    }
}

/// A compiled `workflow` action.
#[derive(Debug)]
pub struct WorkflowAction {
    steps: Vec<Step>,
    on_failure: Vec<Step>,
}

/// Where a failed attempt's record keeps the steps' results for the next attempt.
const MARK: &str = "[workflow ";

/// Largest results kept in a record; past it outputs are dropped (statuses stay).
const MAX_STATE: usize = 32 * 1024;

impl WorkflowAction {
    /// Compiles every step; problems go to `diags` under the trigger's name.
    pub fn build(
        c: &WorkflowConfig,
        trigger: &str,
        config: &Config,
        loc: &Location,
        diags: &mut Diagnostics,
    ) -> Option<WorkflowAction> {
        if c.steps.is_empty() {
            diags.at(
                loc,
                format!("trigger `{trigger}`: a workflow needs at least one step"),
            );
            return None;
        }
        let mut names = std::collections::HashSet::new();
        let mut ok = true;
        let mut compile = |list: &[StepConfig], diags: &mut Diagnostics| -> Vec<Step> {
            let mut out = Vec::new();
            for s in list {
                let at = format!("trigger `{trigger}`: step `{}`", s.name);
                if s.name.is_empty()
                    || !s
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    diags.at(loc, format!("{at}: a step name is letters, digits and `_` (it is `steps.NAME` in templates)"));
                    ok = false;
                } else if !names.insert(s.name.clone()) {
                    diags.at(loc, format!("{at}: the name is used twice"));
                    ok = false;
                }
                if s.max_attempts == 0 {
                    diags.at(loc, format!("{at}: max_attempts must be at least 1"));
                    ok = false;
                }
                let when = match &s.when {
                    Some(w) => match cel::Program::compile(w) {
                        Ok(p) => Some((w.clone(), p)),
                        Err(e) => {
                            diags.at(loc, format!("{at}: invalid CEL expression `{w}`: {e}"));
                            ok = false;
                            None
                        }
                    },
                    None => None,
                };
                if matches!(*s.action, ActionConfig::Workflow(_)) {
                    diags.at(loc, format!("{at}: a step cannot be a workflow"));
                    ok = false;
                    continue;
                }
                let Some(action) = super::Action::build(&s.action, &at, config, loc, diags) else {
                    ok = false;
                    continue;
                };
                out.push(Step {
                    name: s.name.clone(),
                    when,
                    action,
                    max_attempts: s.max_attempts.max(1),
                    backoff: s.backoff.map_or(Duration::from_secs(1), |d| d.0),
                    timeout: s.timeout.map(|d| d.0),
                    sensitive: s.sensitive,
                    dry_run: s.dry_run,
                    approval: s.approval.map(|a| a.timeout),
                });
            }
            out
        };
        let steps = compile(&c.steps, diags);
        let on_failure = compile(&c.on_failure, diags);
        ok.then_some(WorkflowAction { steps, on_failure })
    }

    /// Whether a step waits for vCenter tasks (the workflow's attempts then get as long).
    pub fn runs_vcenter_tasks(c: &WorkflowConfig) -> bool {
        c.steps
            .iter()
            .chain(&c.on_failure)
            .any(|s| s.action.runs_vcenter_tasks())
    }

    /// Runs the steps, resuming after those an earlier attempt finished.
    pub async fn execute(
        &self,
        event: &Event,
        ctx: &ActionContext,
    ) -> Result<Outcome, ActionError> {
        let info = ATTEMPT.try_with(|a| a.clone()).unwrap_or_default();
        let earlier = info
            .previous_error
            .as_deref()
            .and_then(resumed)
            .unwrap_or_default();
        let mut steps = Map::new();
        let mut lines = Vec::new();
        for step in &self.steps {
            if let Some(done) = earlier.get(&step.name) {
                if matches!(done["status"].as_str(), Some("succeeded" | "skipped")) {
                    lines.push(format!(
                        "{}: {} in an earlier attempt",
                        step.name,
                        done["status"].as_str().unwrap_or("")
                    ));
                    steps.insert(step.name.clone(), done.clone());
                    continue;
                }
            }
            match self.run(step, event, ctx, &steps).await {
                Ok(None) => {
                    lines.push(format!("{}: skipped (`when` is false)", step.name));
                    steps.insert(step.name.clone(), json!({"status": "skipped"}));
                }
                Ok(Some(o)) => {
                    lines.push(format!("{}: {}", step.name, o.detail));
                    steps.insert(
                        step.name.clone(),
                        json!({"status": "succeeded", "detail": o.detail, "output": o.output}),
                    );
                }
                Err(e) => {
                    let waits = e.waiting_until.is_some();
                    if waits {
                        lines.push(e.message.clone());
                    } else {
                        lines.push(format!("{}: failed: {}", step.name, e.message));
                    }
                    steps.insert(
                        step.name.clone(),
                        json!({"status": if waits { "waiting" } else { "failed" }, "error": e.message}),
                    );
                    // Waiting for an approval is not a failure: the delivery sleeps.
                    if !waits && (e.permanent || info.last) {
                        for f in &self.on_failure {
                            match self.run(f, event, ctx, &steps).await {
                                Ok(Some(o)) => {
                                    lines.push(format!("on_failure {}: {}", f.name, o.detail))
                                }
                                Ok(None) => lines.push(format!("on_failure {}: skipped", f.name)),
                                Err(fe) => lines
                                    .push(format!("on_failure {}: failed: {}", f.name, fe.message)),
                            }
                        }
                    }
                    // The results so far go with the record, for the next attempt to resume.
                    // A sensitive step's output is not kept: the next attempt runs it again.
                    let sensitive: std::collections::HashSet<&str> = self
                        .steps
                        .iter()
                        .filter(|s| s.sensitive)
                        .map(|s| s.name.as_str())
                        .collect();
                    let kept: Map<String, Value> = steps
                        .into_iter()
                        .filter(|(k, v)| {
                            matches!(v["status"].as_str(), Some("succeeded" | "skipped"))
                                && !sensitive.contains(k.as_str())
                        })
                        .collect();
                    let message = if waits {
                        format!("{} {MARK}{}]", lines.join("; "), state(kept))
                    } else {
                        format!(
                            "step `{}` failed: {}; {} {MARK}{}]",
                            step.name,
                            e.message,
                            lines.join("; "),
                            state(kept)
                        )
                    };
                    return Err(ActionError { message, ..e });
                }
            }
        }
        Ok(Outcome {
            detail: lines.join("; "),
            output: Some(Value::Object(steps)),
        })
    }

    /// One step: `Ok(None)` when its `when` is false, else its tries until one succeeds.
    async fn run(
        &self,
        step: &Step,
        event: &Event,
        ctx: &ActionContext,
        steps: &Map<String, Value>,
    ) -> Result<Option<Outcome>, ActionError> {
        let steps = Value::Object(steps.clone());
        if let Some((src, program)) = &step.when {
            let mut c = cel::Context::default();
            let as_cel = |v: &Value| {
                cel::to_value(v).map_err(|e| ActionError::permanent(format!("when: {e}")))
            };
            c.add_variable_from_value("event", as_cel(&crate::event::view(event))?);
            c.add_variable_from_value("steps", as_cel(&steps)?);
            match program.execute(&c) {
                Ok(cel::Value::Bool(true)) => {}
                Ok(cel::Value::Bool(false)) => return Ok(None),
                Ok(other) => {
                    return Err(ActionError::permanent(format!(
                        "when `{src}`: expected a boolean, got {other:?}"
                    )))
                }
                Err(e) => return Err(ActionError::permanent(format!("when `{src}`: {e}"))),
            }
        }
        // A step that needs an approval runs only once its plan is approved.
        let approved = match step.approval {
            Some(timeout) if !step.dry_run && !super::dry_run() => {
                let plan = || STEPS.scope(steps.clone(), step.action.plan(event, ctx));
                Some(crate::deliveries::approval_gate(ctx, event, &step.name, timeout, plan).await?)
            }
            _ => None,
        };
        let mut wait = step.backoff;
        let mut tries = 0;
        loop {
            tries += 1;
            let execute = STEPS.scope(steps.clone(), step.action.execute(event, ctx));
            let result = if step.dry_run {
                let dry = super::DRY_RUN.scope(
                    true,
                    vsphere::journal::TaskJournal::resuming(None)
                        .planning(true)
                        .scope_owned(execute),
                );
                within(step.timeout, dry).await
            } else {
                within(step.timeout, execute).await
            };
            match result {
                Ok(mut o) => {
                    if let Some(note) = &approved {
                        o.detail.insert_str(0, note);
                    }
                    return Ok(Some(o));
                }
                Err(e) if e.permanent || tries >= step.max_attempts => return Err(e),
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    }
}

/// Runs a step's try within its timeout, if it has one.
async fn within<F>(timeout: Option<Duration>, f: F) -> Result<Outcome, ActionError>
where
    F: std::future::Future<Output = Result<Outcome, ActionError>>,
{
    match timeout {
        Some(t) => tokio::time::timeout(t, f).await.unwrap_or_else(|_| {
            Err(ActionError::transient(format!(
                "the step timed out after {t:?}"
            )))
        }),
        None => f.await,
    }
}

/// The results as JSON for a record, without outputs when they would make it too large.
fn state(mut kept: Map<String, Value>) -> String {
    let text = Value::Object(kept.clone()).to_string();
    if text.len() <= MAX_STATE {
        return text;
    }
    for v in kept.values_mut() {
        if let Some(o) = v.as_object_mut() {
            o.remove("output");
            o.insert("output_dropped".into(), Value::Bool(true));
        }
    }
    Value::Object(kept).to_string()
}

/// The steps an earlier attempt's record says were done.
fn resumed(previous: &str) -> Option<Map<String, Value>> {
    let at = previous.rfind(MARK)? + MARK.len();
    let mut values = serde_json::Deserializer::from_str(&previous[at..]).into_iter::<Value>();
    match values.next()? {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_read_back_from_a_record() {
        let mut m = Map::new();
        m.insert(
            "a".into(),
            json!({"status": "succeeded", "output": {"x": [1, "]"]}}),
        );
        let record = format!("step `b` failed: boom; a: ok {MARK}{}] [vCenter task task-1 still running: the next attempt waits for it]", state(m.clone()));
        assert_eq!(resumed(&record), Some(m));
        assert_eq!(resumed("attempt timed out"), None);
        let big = json!({"status": "succeeded", "output": "x".repeat(MAX_STATE)});
        let mut m = Map::new();
        m.insert("a".into(), big);
        let s = state(m);
        assert!(s.len() < 200, "{s}");
        assert!(s.contains("output_dropped"));
    }
}
