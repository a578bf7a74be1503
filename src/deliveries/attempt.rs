//! One attempt: claim the delivery on the bus, run the trigger's action within its timeout,
//! and describe what happened for the record.

use super::{Clock, Job};
use crate::actions::{ActionContext, ActionError};
use crate::router::Router;
use crate::store::{AttemptRecord, Bus};
use std::sync::Arc;

/// What an attempt did, for the dispatcher to record.
pub(super) struct Done {
    pub(super) job: Job,
    pub(super) record: AttemptRecord,
    pub(super) error: Option<ActionError>,
    /// The bus gave the delivery to this process; `false`: nothing ran (another node has
    /// it, an earlier delivery of its ordering key is open, or the store was unreachable).
    pub(super) claimed: bool,
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
        };
    }
    let started = tokio::time::Instant::now();
    let n = job.attempts + 1;
    let result = tokio::time::timeout(
        trigger.policy.timeout,
        trigger.action.execute(&job.event, &ctx),
    )
    .await;
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
    Done {
        record: AttemptRecord {
            n,
            started_at,
            duration_ms,
            outcome: outcome.into(),
            detail,
        },
        job,
        error,
        claimed: true,
    }
}
