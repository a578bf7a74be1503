//! Which vCenter task a unit of work left running.
//!
//! A caller that bounds an operation with a timeout drops it mid-way, perhaps while the task
//! it started still runs in vCenter. Run the operation inside [`TaskJournal::scope`] and
//! [`TaskJournal::unfinished`] names that task afterwards; the next try of the same work
//! passes it as `earlier` and calls [`Client::await_earlier_task`](crate::Client) first,
//! so that it waits for the task rather than starting the same change a second time.

use std::sync::{Arc, Mutex};

tokio::task_local! {
    static JOURNAL: TaskJournal;
}

/// The task of one unit of work that was started and not yet seen to end.
#[derive(Debug, Clone, Default)]
pub struct TaskJournal {
    started: Arc<Mutex<Option<String>>>,
    earlier: Option<String>,
    /// Dry run: changing calls are not made, only noted in `planned`.
    planning: bool,
    planned: Arc<Mutex<Vec<String>>>,
}

impl TaskJournal {
    /// A journal for a try that follows one which left task `earlier` (a `Task` moid) running.
    pub fn resuming(earlier: Option<String>) -> TaskJournal {
        TaskJournal {
            started: Arc::default(),
            earlier,
            planning: false,
            planned: Arc::default(),
        }
    }

    /// In a dry run (`on`), the operations run inside [`TaskJournal::scope`] read what they
    /// need but make no changing call (no `*_Task`, no guest operation): each is noted
    /// instead ([`TaskJournal::planned`]) and answered as if it succeeded at once.
    pub fn planning(mut self, on: bool) -> TaskJournal {
        self.planning = on;
        self
    }

    /// The changing calls a dry run did not make, e.g. `ReconfigVM_Task on
    /// VirtualMachine:vm-42`.
    pub fn planned(&self) -> Vec<String> {
        self.planned.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// The changing calls the dry run running now did not make.
    pub fn planned_now() -> Vec<String> {
        JOURNAL.try_with(|j| j.planned()).unwrap_or_default()
    }

    /// Whether the work running now is a dry run.
    pub fn is_planning() -> bool {
        JOURNAL.try_with(|j| j.planning).unwrap_or(false)
    }

    /// Notes a changing call a dry run did not make.
    pub(crate) fn plan(what: String) {
        let _ = JOURNAL.try_with(|j| {
            if let Ok(mut p) = j.planned.lock() {
                p.push(what);
            }
        });
    }

    /// Runs `f` with this journal: tasks `f` starts through [`crate::Client`] are noted.
    pub async fn scope<F: std::future::Future>(&self, f: F) -> F::Output {
        JOURNAL.scope(self.clone(), f).await
    }

    /// Like [`TaskJournal::scope`], owning the journal (for a future kept beyond this call).
    pub async fn scope_owned<F: std::future::Future>(self, f: F) -> F::Output {
        JOURNAL.scope(self, f).await
    }

    /// The task started within [`TaskJournal::scope`] whose end was not seen.
    pub fn unfinished(&self) -> Option<String> {
        self.started.lock().map(|s| s.clone()).unwrap_or(None)
    }

    /// The task the previous try left running, as given to [`TaskJournal::resuming`]; read
    /// within the scope.
    pub fn earlier() -> Option<String> {
        JOURNAL.try_with(|j| j.earlier.clone()).ok().flatten()
    }

    fn set(value: Option<&str>) {
        let _ = JOURNAL.try_with(|j| {
            if let Ok(mut s) = j.started.lock() {
                *s = value.map(str::to_string);
            }
        });
    }

    /// Notes that `task` was started.
    pub(crate) fn started(task: &str) {
        Self::set(Some(task));
    }

    /// Notes that `task` was seen to end (in success or error).
    pub(crate) fn ended(task: &str) {
        let _ = JOURNAL.try_with(|j| {
            if let Ok(mut s) = j.started.lock() {
                if s.as_deref() == Some(task) {
                    *s = None;
                }
            }
        });
    }
}
