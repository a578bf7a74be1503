//! One attempt: claim the delivery on the bus, run the trigger's action within its timeout,
//! and describe what happened for the record.

use super::retry::decide;
use super::{Clock, Job};
use crate::actions::{ActionContext, ActionError};
use crate::router::Router;
use crate::store::{AttemptRecord, Bus, State};
use cloudevents::EventBuilder;
use std::sync::Arc;

/// What an attempt did, for the dispatcher to record.
pub(super) struct Done {
    pub(super) job: Job,
    pub(super) record: AttemptRecord,
    pub(super) error: Option<ActionError>,
    /// The bus gave the delivery to this process; `false`: nothing ran (another node has
    /// it, an earlier delivery of its ordering key is open, or the store was unreachable).
    pub(super) claimed: bool,
    /// The delivery's new state and its next attempt's time, once decided.
    pub(super) decided: Option<(State, Option<i64>)>,
    /// The task recorded the attempt; `false` leaves it to the dispatcher (the store
    /// refused it, or the task did not return).
    pub(super) recorded: bool,
}

/// Claims `job` and, when this process got it, runs its trigger's action once.
pub(super) async fn attempt(
    router: Arc<Router>,
    bus: Arc<dyn Bus>,
    ctx: ActionContext,
    clock: Clock,
    job: Job,
) -> Done {
    let trigger = &router.triggers[job.trigger];
    let started_at = clock.now_ms();
    // A paused trigger's deliveries wait (open in the store) until it is resumed; one that
    // reached its blast radius is paused now.
    let paused = ctx.pauses.is_paused(&trigger.name)
        || (trigger.policy.global_radius.is_some() && ctx.pauses.is_paused(ALL));
    if paused {
        ctx.ingest
            .metrics()
            .guard_rail(&trigger.name, "pause", "held");
    }
    // Held until the attempt is recorded: a counted change in flight.
    let mut leave = None;
    let go = !paused
        && within_blast_radius(&router, trigger, &ctx, clock, false, true)
            .await
            .is_some()
        && {
            leave = within_blast_radius(&router, trigger, &ctx, clock, true, true).await;
            leave.is_some()
        };
    let claimed = go
        && match bus.claim(job.id).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(delivery = job.id, error = %e, "cannot claim the delivery; it stays open in the store");
                false
            }
        };
    if !claimed {
        return Done {
            record: AttemptRecord {
                n: job.attempts,
                started_at,
                duration_ms: 0,
                outcome: String::new(),
                detail: String::new(),
            },
            job,
            error: None,
            claimed: false,
            decided: None,
            recorded: false,
        };
    }
    let started = tokio::time::Instant::now();
    let n = job.attempts + 1;
    // Most attempts end well within a moment: only a longer one is marked `running` (on a
    // bus whose claim did not mark it), which spares the others a write.
    // A vSphere action notes the vCenter task it starts: one still running when the attempt
    // ends (a timeout) is recorded, and the next attempt waits for it instead of starting
    // the same change again.
    let dry_run = trigger.policy.dry_run;
    let journal = matches!(
        trigger.action,
        crate::actions::Action::Vsphere(_) | crate::actions::Action::Workflow(_)
    )
    .then(|| {
        vsphere::journal::TaskJournal::resuming(
            job.last_error
                .as_deref()
                .and_then(crate::actions::vsphere::running_task),
        )
        .planning(dry_run)
    });
    // What the action may know of the delivery's history: a workflow resumes from the
    // last failed attempt's record, and runs its `on_failure` steps on the last attempt.
    let info = crate::actions::AttemptInfo {
        delivery: job.id,
        trigger: trigger.name.clone(),
        previous_error: job.last_error.clone(),
        last: n.saturating_sub(job.attempt_base) >= trigger.policy.max_attempts,
    };
    let discarded = ctx.pauses.is_paused(&discard_mark(job.id));
    let result = {
        // A change that needs an approval runs only once its plan is approved.
        let gated = async {
            if discarded {
                return Err(ActionError::permanent(
                    "discarded by an operator while its scope was paused (`reflex pauses discard`); nothing was changed; `reflex replay` runs it again",
                ));
            }
            let approved = match trigger.policy.approval {
                Some(timeout) if !dry_run => Some(
                    super::approval::gate(&ctx, &job.event, "", timeout, || {
                        trigger.action.plan(&job.event, &ctx)
                    })
                    .await?,
                ),
                _ => None,
            };
            let mut outcome = trigger.action.execute(&job.event, &ctx).await?;
            if let Some(note) = approved {
                outcome.detail.insert_str(0, &note);
            }
            Ok::<_, ActionError>(outcome)
        };
        // A correlated delivery's action sees every event of its window as `events`.
        let correlated = async {
            if trigger.policy.correlate.is_none() {
                return gated.await;
            }
            let events = correlated_events(&ctx, &job).await?;
            crate::actions::CORRELATED.scope(events, gated).await
        };
        let execute =
            crate::actions::DRY_RUN.scope(dry_run, crate::actions::ATTEMPT.scope(info, correlated));
        let action = tokio::time::timeout(trigger.policy.timeout, async {
            match &journal {
                Some(j) => j.scope(execute).await,
                None => execute.await,
            }
        });
        tokio::pin!(action);
        tokio::select! {
            biased;
            r = &mut action => r,
            _ = tokio::time::sleep(crate::store::RUNNING_MARK_AFTER) => {
                if let Err(e) = bus.mark_running(job.id).await {
                    tracing::warn!(delivery = job.id, error = %e, "cannot mark the delivery running; the attempt goes on");
                }
                action.await
            }
        }
    };
    let duration_ms = started.elapsed().as_millis() as i64;
    if dry_run && matches!(result, Ok(Ok(_))) {
        ctx.ingest
            .metrics()
            .guard_rail(&trigger.name, "dry_run", "planned");
    }
    let (outcome, mut detail, mut error) = match result {
        Ok(Ok(o)) => ("succeeded", o.detail, None),
        Ok(Err(e)) if e.waiting_until.is_some() => ("waiting", e.message.clone(), Some(e)),
        Ok(Err(e)) => ("failed", e.message.clone(), Some(e)),
        Err(_) => {
            let msg = format!(
                "attempt timed out after {:?} ({} action)",
                trigger.policy.timeout,
                trigger.action.kind()
            );
            ("timeout", msg.clone(), Some(ActionError::transient(msg)))
        }
    };
    if let Some((guard, decision)) = error.as_ref().and_then(|e| guard_rail_of(&e.message)) {
        ctx.ingest
            .metrics()
            .guard_rail(&trigger.name, guard, decision);
    }
    if let (Some(task), Some(e)) = (journal.and_then(|j| j.unfinished()), error.as_mut()) {
        let note = crate::actions::vsphere::task_note(&task);
        detail.push_str(&note);
        e.message.push_str(&note);
    }
    // A secret can end up in what an action reports (a URL in a driver's error, a
    // program's output): masked by value before it is recorded, logged or answered.
    let detail = crate::config::secret::redact(&detail).into_owned();
    let error = error.map(|mut e| {
        e.message = crate::config::secret::redact(&e.message).into_owned();
        e
    });
    let record = AttemptRecord {
        n,
        started_at,
        duration_ms,
        outcome: outcome.into(),
        detail,
    };
    // Recorded here, so that the attempts running at once are recorded at once (the store
    // batches them) rather than one by one by the dispatcher.
    let (state, next_at) = decide(&trigger.policy, clock, &job, n, &error);
    let recorded = match bus
        .finish_attempt(job.id, record.clone(), state, next_at)
        .await
    {
        Ok(()) => true,
        Err(e) => {
            super::log_unrecorded(job.id, &e, 1);
            false
        }
    };
    // Recorded: no longer running (so not counted twice by those waiting to look).
    drop(leave);
    // The change that spends a budget pauses at once, rather than the next one finding it
    // spent (on a bus that re-delivers later, that could be a while).
    if recorded && outcome == "succeeded" && !dry_run {
        for global in [false, true] {
            within_blast_radius(&router, trigger, &ctx, clock, global, false).await;
        }
    }
    if discarded {
        let mark = discard_mark(job.id);
        if ctx.ingest.store().resume_trigger(&mark).await.is_ok() {
            ctx.pauses.mark(&mark, false);
        }
    }
    Done {
        record,
        job,
        error,
        claimed: true,
        decided: Some((state, next_at)),
        recorded,
    }
}

/// The guard rail that stopped an action, read from the reason it gives (reflex's own
/// words, also inside a workflow step's): for the guard-rail metrics.
fn guard_rail_of(message: &str) -> Option<(&'static str, &'static str)> {
    if message.contains("refused by a guard rail:") {
        Some(("protect", "refused"))
    } else if message.contains("loop guard: this would be event") {
        Some(("chain_depth", "refused"))
    } else if message.contains("failed verification:") {
        Some(("verify", "failed"))
    } else if message.contains("held by a budget:") {
        Some(("budget", "held"))
    } else if message.contains("held by a pause (scope:") {
        Some(("pause", "held"))
    } else {
        None
    }
}

/// The events a correlated delivery fired with, as templates see them; the delivery's own
/// event alone when it has none (a held one, replayed).
async fn correlated_events(
    ctx: &ActionContext,
    job: &super::Job,
) -> Result<serde_json::Value, ActionError> {
    let bodies = ctx
        .ingest
        .store()
        .correlated_events(job.id)
        .await
        .map_err(|e| {
            ActionError::transient(format!(
                "cannot read the correlated events: {e}; the attempt is retried"
            ))
        })?;
    let mut events = Vec::with_capacity(bodies.len().max(1));
    for body in &bodies {
        let e = crate::event::from_json(body).map_err(|e| {
            ActionError::permanent(format!("a correlated event is unreadable: {e}"))
        })?;
        events.push(crate::event::view(&e));
    }
    if events.is_empty() {
        events.push(crate::event::view(&job.event));
    }
    Ok(serde_json::Value::Array(events))
}

/// The mark that tells a held delivery's next attempt to end it: an operator discarded the
/// changes a paused scope held.
pub fn discard_mark(delivery: i64) -> String {
    format!("discard:{delivery}")
}

/// The name under which `deliveries.blast_radius` pauses every trigger it counts.
pub const ALL: &str = "*";

/// Leave to make one change; for one the global blast radius counts, it is counted as
/// running on this node until dropped (after the attempt's record).
pub(super) struct Leave(Option<Arc<std::sync::atomic::AtomicU64>>);

impl Drop for Leave {
    fn drop(&mut self) {
        if let Some(n) = &self.0 {
            n.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Whether the trigger may make another change: when it (`global`: all the triggers
/// `deliveries.blast_radius` counts) has made `max` within the window (counted in the store,
/// across nodes, plus those running on this node), it is paused (they are, as `*`), with a
/// `com.reflex.trigger.paused` event, and `None`. An unreadable count is `None` too: the
/// change waits.
async fn within_blast_radius(
    router: &Router,
    trigger: &crate::router::Trigger,
    ctx: &ActionContext,
    clock: Clock,
    global: bool,
    reserve: bool,
) -> Option<Leave> {
    let limit = match global {
        true => trigger.policy.global_radius,
        false => trigger.policy.blast_radius,
    };
    // Checked before anything is built: every attempt passes here, most with no limit.
    let Some((max, within)) = limit else {
        return Some(Leave(None));
    };
    let (pause, triggers) = match global {
        true => (ALL, router.changing()),
        false => (trigger.name.as_str(), vec![trigger.name.clone()]),
    };
    let store = ctx.ingest.store();
    // The rest of a global budget may be spent by changes running now: wait for them to
    // end (they are few, and end within their timeout) and look again, rather than drop
    // the delivery until the next pass over the store.
    let (made, _one_look) = loop {
        let one_look = match global {
            true => Some(ctx.pauses.checking.lock().await),
            false => None,
        };
        // Read before the store's count: a change that ends meanwhile sent its record
        // before it left this number, so it is counted twice at worst, never missed.
        let running = match global {
            true => ctx
                .pauses
                .in_flight
                .load(std::sync::atomic::Ordering::SeqCst),
            false => 0,
        };
        // The previous attempt's record must be counted (the embedded store writes it after).
        store.flush().await;
        let since = clock.now_ms() - within.as_millis() as i64;
        let made = match store.changes_since(pause, &triggers, since).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(trigger = %trigger.name, error = %e, "cannot count the changes for a blast radius; the deliveries wait");
                return None;
            }
        };
        if made + running < max {
            if !global || !reserve {
                return Some(Leave(None));
            }
            let n = ctx.pauses.in_flight.clone();
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Some(Leave(Some(n)));
        }
        if made >= max {
            break (made, one_look);
        }
        if !reserve {
            return None;
        }
        drop(one_look);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let reason = if global {
        format!(
            "blast radius of all triggers (deliveries.blast_radius): {made} changes within {within:?} (at most {max}); every trigger that may change something waits; resume with `reflex triggers resume '*'`"
        )
    } else {
        format!(
            "blast radius: {made} changes within {within:?} (at most {max}); resume with `reflex triggers resume {pause}`"
        )
    };
    ctx.pauses.mark(pause, true);
    ctx.ingest
        .metrics()
        .guard_rail(&trigger.name, "blast_radius", "paused");
    match store.pause_trigger(pause, &reason).await {
        Ok(true) => tracing::warn!(trigger = %pause, %reason, "trigger paused"),
        // Another attempt or node paused it first, and announced it.
        Ok(false) => return None,
        Err(e) => {
            tracing::warn!(trigger = %pause, error = %e, "cannot record the pause; the trigger waits on this node")
        }
    }
    let at = clock.now_ms();
    let event = cloudevents::EventBuilderV10::new()
        .id(format!("{pause}:paused:{at}"))
        .source(format!("/reflex/triggers/{pause}"))
        .ty("com.reflex.trigger.paused")
        .subject(pause.to_string())
        .time(chrono::Utc::now())
        .data(
            "application/json",
            serde_json::json!({"trigger": pause, "reason": reason, "changes": made, "max": max, "within_ms": within.as_millis() as u64, "last": trigger.name}),
        )
        .build();
    if let Ok(event) = event {
        if let Err(e) = ctx.ingest.submit("reflex", vec![event]).await {
            tracing::warn!(trigger = %pause, error = %e, "cannot announce the pause");
        }
    }
    None
}
