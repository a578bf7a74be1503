//! Approvals: a change with `approval:` (a trigger's action or a workflow step) runs only
//! once a person approved its plan.
//!
//! The first attempt runs the change dry (its plan: what it would do, read from the live
//! state), records an approval that waits, announces it as a `com.reflex.approval.requested`
//! event, and puts the delivery to sleep until the approval's deadline. A decision (API,
//! CLI) wakes the delivery at once. The next attempt then
//! - on a rejection, or past the deadline, ends the delivery dead, nothing changed;
//! - on an approval, runs the change dry again: when the plan is the one approved, the
//!   change runs for real; when the state changed meanwhile, the new plan is shown for
//!   approval instead (the approval waits again).
//!
//! Who decided, when and why is kept on the approval and in the attempt's record. An attempt
//! that waits does not count toward the delivery's `max_attempts`.

use crate::actions::{ActionContext, ActionError, Outcome};
use crate::store::{Approval, ApprovalChange, ApprovalState, NewApproval};
use cloudevents::{AttributesReader, Event, EventBuilder};
use std::future::Future;
use std::time::Duration;

/// The event type announcing an approval to decide (its data: the approval).
pub const APPROVAL_REQUESTED: &str = "com.reflex.approval.requested";

/// Whether the change of `step` (empty: the trigger's action) of the delivery running now
/// may run: `Ok(note)` when approved for the plan `plan` makes now (the note says by whom,
/// for the record); otherwise the error the attempt ends with (waiting, or dead).
pub(crate) async fn gate<F, Fut>(
    ctx: &ActionContext,
    event: &Event,
    step: &str,
    timeout: Duration,
    plan: F,
) -> Result<String, ActionError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Outcome, ActionError>>,
{
    let info = crate::actions::ATTEMPT
        .try_with(|a| a.clone())
        .unwrap_or_default();
    let store = ctx.ingest.store();
    let unreadable = |e: crate::store::StoreError| {
        ActionError::transient(format!(
            "cannot read the approval of this change: {e}; the attempt is retried"
        ))
    };
    let what = if step.is_empty() {
        String::new()
    } else {
        format!("step `{step}`: ")
    };
    let note = |decision: &str| {
        ctx.ingest
            .metrics()
            .guard_rail(&info.trigger, "approval", decision)
    };
    let now = crate::store::now_ms();
    let deadline = now + timeout.as_millis().min(i64::MAX as u128) as i64;
    let found = store
        .approval_for(info.delivery, step)
        .await
        .map_err(unreadable)?;
    let Some(a) = found else {
        // A plan that cannot be made (the VM is gone) is not worth asking anyone about.
        let plan = plan().await?.detail;
        let a = store
            .request_approval(NewApproval {
                delivery_id: info.delivery,
                trigger: info.trigger.clone(),
                step: step.to_string(),
                plan,
                event_type: event.ty().to_string(),
                subject: event.subject().map(str::to_string),
                expires_at: deadline,
            })
            .await
            .map_err(unreadable)?;
        announce(ctx, &a).await;
        note("waiting");
        return Err(waiting(&a, &what, "waits for approval"));
    };
    match a.state {
        ApprovalState::Waiting if now < a.expires_at => {
            Err(waiting(&a, &what, "still waits for approval"))
        }
        ApprovalState::Waiting => {
            let a = store
                .change_approval(a.id, ApprovalChange::Expire)
                .await
                .map_err(unreadable)?
                .unwrap_or(a);
            note("expired");
            Err(refused(&a, &what))
        }
        ApprovalState::Rejected | ApprovalState::Expired => {
            note(a.state.as_str());
            Err(refused(&a, &what))
        }
        ApprovalState::Approved => {
            let now_plan = plan().await?.detail;
            if now_plan == a.plan {
                note("approved");
                return Ok(format!(
                    "{what}approved (#{}) by {}{}; ",
                    a.id,
                    a.decided_by.as_deref().unwrap_or("someone"),
                    a.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ));
            }
            let reason = format!(
                "the state changed after {} approved it; the plan was: {}",
                a.decided_by.as_deref().unwrap_or("someone"),
                a.plan
            );
            let changed = store
                .change_approval(
                    a.id,
                    ApprovalChange::Replan {
                        plan: now_plan,
                        reason,
                        expires_at: deadline,
                    },
                )
                .await
                .map_err(unreadable)?;
            match changed {
                Some(a) => {
                    announce(ctx, &a).await;
                    note("replanned");
                    Err(waiting(
                        &a,
                        &what,
                        "waits for approval again: its plan changed",
                    ))
                }
                // Decided again meanwhile (another node replanned it): look next attempt.
                None => Err(ActionError::transient(format!(
                    "{what}approval #{} changed while it was read; the attempt is retried",
                    a.id
                ))),
            }
        }
    }
}

/// The attempt's end while the approval waits: the delivery sleeps until its deadline.
fn waiting(a: &Approval, what: &str, how: &str) -> ActionError {
    let until = chrono::DateTime::from_timestamp_millis(a.expires_at)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    ActionError {
        waiting_until: Some(a.expires_at),
        ..ActionError::transient(format!(
            "{what}{how} #{} until {until} (`reflex approve {0}` or `reflex reject {0} --reason …`); plan: {}",
            a.id, a.plan
        ))
    }
}

/// The delivery's end when the change was rejected or nobody decided in time.
fn refused(a: &Approval, what: &str) -> ActionError {
    let how = match a.state {
        ApprovalState::Expired => "was not approved in time".to_string(),
        _ => format!(
            "was rejected by {}{}",
            a.decided_by.as_deref().unwrap_or("someone"),
            a.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
    };
    ActionError::permanent(format!(
        "{what}approval #{} {how}; nothing was changed",
        a.id
    ))
}

/// Announces an approval to decide, so that a trigger can take it to people (Slack, mail).
async fn announce(ctx: &ActionContext, a: &Approval) {
    let event = cloudevents::EventBuilderV10::new()
        .id(format!("approval:{}:{}", a.id, a.requested_at))
        .source(format!("/reflex/triggers/{}", a.trigger))
        .ty(APPROVAL_REQUESTED)
        .subject(a.id.to_string())
        .time(chrono::Utc::now())
        .data("application/json", {
            let mut v = serde_json::to_value(a).unwrap_or_default();
            for (k, ms) in [
                ("requested_at", a.requested_at),
                ("expires_at", a.expires_at),
            ] {
                if let Some(t) = chrono::DateTime::from_timestamp_millis(ms) {
                    v[k] = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true).into();
                }
            }
            v
        })
        .build();
    if let Ok(event) = event {
        if let Err(e) = ctx.ingest.submit("reflex", vec![event]).await {
            tracing::warn!(approval = a.id, error = %e, "cannot announce the approval");
        }
    }
    tracing::warn!(approval = a.id, trigger = %a.trigger, step = %a.step, plan = %a.plan, "a change waits for approval");
}

/// Why a decision was not taken.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The request itself is wrong (no reason for a rejection, a field too long).
    #[error("{0}")]
    Bad(String),
    /// The approval was decided already (or expired).
    #[error("{0}")]
    Conflict(String),
    /// No such approval, or the store could not be reached.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Takes decisions on approvals, for the API and for Slack's buttons alike: records who
/// decided and why, then wakes the delivery so that it runs (or ends) at once.
#[derive(Clone)]
pub struct Decider {
    store: std::sync::Arc<dyn crate::store::Store>,
    bus: std::sync::Arc<dyn crate::store::Bus>,
    dispatch: tokio::sync::mpsc::UnboundedSender<super::Admission>,
}

impl Decider {
    /// A decider over the store and bus the deliveries live in.
    pub fn new(
        store: std::sync::Arc<dyn crate::store::Store>,
        bus: std::sync::Arc<dyn crate::store::Bus>,
        dispatch: tokio::sync::mpsc::UnboundedSender<super::Admission>,
    ) -> Decider {
        Decider {
            store,
            bus,
            dispatch,
        }
    }

    /// Approves or rejects waiting approval `id` on behalf of `by`; a rejection needs a
    /// reason. Returns the approval as decided.
    pub async fn decide(
        &self,
        id: i64,
        approve: bool,
        by: &str,
        reason: Option<String>,
    ) -> Result<Approval, DecideError> {
        let by = by.trim();
        let reason = reason
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty());
        if by.is_empty() || by.chars().count() > 200 {
            return Err(DecideError::Bad(
                "`by` must name who decides, in at most 200 characters".into(),
            ));
        }
        if reason.as_ref().is_some_and(|r| r.chars().count() > 2000) {
            return Err(DecideError::Bad(
                "`reason` is at most 2000 characters".into(),
            ));
        }
        if !approve && reason.is_none() {
            return Err(DecideError::Bad(
                "a rejection needs a reason (`reason`)".into(),
            ));
        }
        let change = ApprovalChange::Decide {
            approve,
            by: by.to_string(),
            reason,
        };
        let Some(a) = self.store.change_approval(id, change).await? else {
            return Err(match self.store.approval(id).await? {
                Some(a) => DecideError::Conflict(format!(
                    "approval {id} is {} already{}",
                    a.state.as_str(),
                    a.decided_by
                        .as_deref()
                        .map(|b| format!(" (by {b})"))
                        .unwrap_or_default()
                )),
                None => {
                    DecideError::Store(crate::store::StoreError::NotFound(format!("approval {id}")))
                }
            });
        };
        // The attempt that asked may not be recorded yet (it is written in a batch): wait
        // for it, then wake the delivery. One not woken runs at the approval's deadline.
        self.bus.flush().await;
        let mut woken = false;
        for _ in 0..20 {
            match self.bus.wake(a.delivery_id).await {
                Ok(Some(_)) => {
                    woken = true;
                    break;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => {
                    tracing::warn!(approval = id, delivery = a.delivery_id, error = %e, "cannot wake the delivery; it runs at the approval's deadline");
                    break;
                }
            }
        }
        if woken {
            let _ = self.dispatch.send(super::Admission::Rescan);
        }
        tracing::warn!(approval = id, trigger = %a.trigger, delivery = a.delivery_id, by = %by, decision = a.state.as_str(), "approval decided");
        Ok(a)
    }
}
