//! One attempt: claim the delivery on the bus, run the trigger's action within its timeout,
//! and describe what happened for the record.

use super::retry::decide;
use super::{Clock, Job};
use crate::actions::{ActionContext, ActionError};
use crate::router::Router;
use crate::store::{AttemptRecord, Bus, State};
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
    let claimed = match bus.claim(job.id).await {
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
    let result = {
        let action = tokio::time::timeout(
            trigger.policy.timeout,
            trigger.action.execute(&job.event, &ctx),
        );
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
    let (outcome, detail, error) = match result {
        Ok(Ok(o)) => ("succeeded", o.detail, None),
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
    Done {
        record,
        job,
        error,
        claimed: true,
        decided: Some((state, next_at)),
        recorded,
    }
}
