//! The drain: when reflex stops or reloads, running attempts get `deliveries.drain` to
//! finish; each is recorded, and those still running after it are recorded as interrupted
//! and run again at the next start.

use super::attempt::Done;
use super::retry::decide;
use super::{Dispatcher, Job};
use crate::actions::ActionError;
use crate::store::AttemptRecord;
use std::time::Duration;

impl Dispatcher {
    /// Waits for the running attempts up to `drain`, records them, and flushes the store.
    pub(super) async fn drain(&mut self, drain: Duration) {
        let in_flight = self.tasks.len();
        if in_flight > 0 {
            tracing::info!(in_flight, "draining deliveries");
        }
        let deadline = tokio::time::Instant::now() + drain;
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                Ok(Some(Ok((task, done)))) => {
                    self.in_flight.remove(&task);
                    self.record_drained(done).await;
                }
                Ok(Some(Err(e))) => {
                    if let Some((job, started)) = self.in_flight.remove(&e.id()) {
                        let why =
                            format!("the attempt stopped unexpectedly ({e}); it will be retried");
                        self.record_drained(unfinished(
                            job,
                            started,
                            self.clock.now_ms(),
                            "failed",
                            why,
                        ))
                        .await;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        abandoned = self.tasks.len(),
                        "drain timeout; the attempts still running are recorded as interrupted and run again at the next start"
                    );
                    for (_, (job, started)) in std::mem::take(&mut self.in_flight) {
                        let why = format!(
                            "interrupted: reflex stopped or reloaded while the attempt ran (still running after {drain:?}); it will be retried"
                        );
                        self.record_drained(unfinished(
                            job,
                            started,
                            self.clock.now_ms(),
                            "interrupted",
                            why,
                        ))
                        .await;
                    }
                    self.tasks.abort_all();
                    // Let the aborted tasks go before the last flush: none may write after it.
                    while self.tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        if !self.record_unrecorded().await {
            tracing::error!(
                left = self.unrecorded.len(),
                "stopping with attempt records the store refused; those deliveries run again at the next start"
            );
        }
        self.bus.flush().await;
    }

    /// Records an attempt that finished (or was cut off) while draining; a retry is left,
    /// with its backoff, for the next start.
    pub(super) async fn record_drained(&mut self, done: Done) {
        let Done {
            job,
            record,
            error,
            claimed,
            decided,
            recorded,
        } = done;
        self.running[job.trigger] -= 1;
        if !claimed || recorded {
            return;
        }
        let policy = &self.router.triggers[job.trigger].policy;
        let (state, next_at) =
            decided.unwrap_or_else(|| decide(policy, self.clock, &job, record.n, &error));
        self.record(job.id, record, state, next_at).await;
    }
}

/// The record of an attempt whose task did not return (it panicked, or was abandoned).
pub(super) fn unfinished(
    job: Job,
    started_at: i64,
    now: i64,
    outcome: &str,
    detail: String,
) -> Done {
    Done {
        record: AttemptRecord {
            n: job.attempts + 1,
            started_at,
            duration_ms: (now - started_at).max(0),
            outcome: outcome.into(),
            detail: detail.clone(),
        },
        job,
        error: Some(ActionError::transient(detail)),
        claimed: true,
        decided: None,
        recorded: false,
    }
}
