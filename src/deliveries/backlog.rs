//! The backlog: open deliveries that wait in the store rather than in memory (beyond
//! `store.deliveries_in_memory`, retries due later, starts a rate put off, work another node
//! left) and are read back as room frees up and as they fall due.

use super::{Dispatcher, Job};
use crate::store::{AttemptRecord, OpenDelivery, State};
use std::time::Duration;

/// Retries due further ahead than this (ms) wait in the store rather than in memory.
pub const PARK_RETRY_AFTER: i64 = 2_000;

/// Open deliveries may be waiting in the store, not in memory: they are read back in passes
/// over the ids.
pub(super) struct Backlog {
    /// Last id read in this pass.
    pub(super) cursor: i64,
    /// A delivery at or below the cursor was left in the store: another pass is needed.
    pub(super) behind: bool,
}

impl Dispatcher {
    /// Sends the put-off starts to the store (before any read of it, which flushes first).
    pub(super) async fn send_deferred(&mut self) {
        for (id, at) in std::mem::take(&mut self.deferred) {
            // Not recorded: the delivery is due at once in the store, which only runs it
            // earlier than the rate wanted after a restart.
            if let Err(e) = self.bus.defer(id, at).await {
                tracing::warn!(delivery = id, error = %e, "cannot record a start put off by the trigger's rate");
            }
        }
    }

    /// Reads back what waits in the store, while there is room: due retries, then open
    /// deliveries a pass at a time.
    pub(super) async fn refill(&mut self) {
        if !self.record_unrecorded().await {
            return; // the store is unreachable: reading from it would fail too
        }
        self.send_deferred().await;
        self.read_due_retries().await;
        while self.backlog.is_some() {
            let room = self.max_held.saturating_sub(self.held.len());
            if room < (self.max_held / 10).max(1) {
                return;
            }
            let cursor = self.backlog.as_ref().map_or(0, |b| b.cursor);
            // Attempts finished before now must be committed, or they would read as open.
            self.bus.flush().await;
            let due_by = self.clock.now_ms() + PARK_RETRY_AFTER;
            let open = match self.bus.open_deliveries(cursor, room, due_by).await {
                Ok(open) => open,
                Err(e) => {
                    tracing::error!(error = %e, "reading open deliveries back from the store; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return;
                }
            };
            let end_of_pass = open.len() < room;
            let mut cursor = cursor;
            let before = self.held.len();
            for d in open {
                cursor = d.id;
                self.max_read = self.max_read.max(d.id);
                self.take_back(d).await;
            }
            let read = self.held.len() - before;
            if read > 0 {
                tracing::info!(read, "open deliveries read back from the store");
            }
            let b = self.backlog.as_mut().expect("the loop checks it");
            b.cursor = cursor;
            if end_of_pass {
                // The pass skipped later retries: learn when the first is due.
                self.parked_left = true;
                if b.behind {
                    *b = Backlog {
                        cursor: 0,
                        behind: false,
                    };
                } else {
                    self.backlog = None;
                }
            }
            if read > 0 {
                return; // start these; the next turn of the loop reads on
            }
        }
    }

    /// Reads back the retries that waited in the store and are now due.
    pub(super) async fn read_due_retries(&mut self) {
        let now = self.clock.now_ms();
        if !(self.parked_left || self.parked_due.is_some_and(|t| t <= now)) {
            return;
        }
        let room = self.max_held.saturating_sub(self.held.len());
        if room == 0 {
            // Read them once room frees up (a completion wakes the loop).
            self.parked_left = true;
            self.parked_due = None;
            return;
        }
        self.bus.flush().await;
        // Held retries can be among the due ones: ask for enough to see past them.
        let due = match self.bus.due_deliveries(now, room + self.held.len()).await {
            Ok(due) => due,
            Err(e) => {
                tracing::error!(error = %e, "reading due retries back from the store; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return;
            }
        };
        let before = self.held.len();
        for d in due {
            if self.held.len() >= self.max_held {
                break;
            }
            self.take_back(d).await;
        }
        self.parked_left = self.held.len() - before == room;
        // Starts put off just now are not in the store yet: they count too.
        let local = self.deferred.iter().map(|d| d.1).min();
        let stored = match self.bus.next_due_after(now).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "reading the next retry time from the store");
                Some(now + 1000)
            }
        };
        self.parked_due = stored.into_iter().chain(local).min();
    }

    /// Holds a delivery read from the store, unless held already or no longer runnable.
    pub(super) async fn take_back(&mut self, d: OpenDelivery) {
        if self.held.contains(&d.id) {
            return;
        }
        let (id, attempts) = (d.id, d.attempts);
        match Job::from_open(d, &self.router) {
            Ok(job) => self.hold(job),
            Err(why) => {
                tracing::warn!(delivery = id, "{why}; dead-lettered");
                let rec = AttemptRecord {
                    n: attempts + 1,
                    started_at: self.clock.now_ms(),
                    duration_ms: 0,
                    outcome: "failed".into(),
                    detail: why,
                };
                self.record(id, rec, State::Dead, None).await;
            }
        }
    }
}
