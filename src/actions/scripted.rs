//! A test-only action whose attempts answer from a script, so that the dispatcher's timing
//! (retries, rates, the drain) can be checked on tokio's paused time with no I/O.

use super::{ActionError, Outcome};
use cloudevents::{AttributesReader, Event};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// One scripted answer: how long the attempt takes, and its result.
pub type Step = (Duration, Result<(), ActionError>);

/// The action: answers from `script` in order (success once it is empty) and reports each
/// attempt's event id and start time.
#[derive(Clone)]
pub struct Scripted {
    script: Arc<Mutex<VecDeque<Step>>>,
    started: mpsc::UnboundedSender<(String, tokio::time::Instant)>,
}

impl std::fmt::Debug for Scripted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scripted")
    }
}

impl Scripted {
    /// The action and the receiver of its attempts' starts.
    pub fn new(
        script: Vec<Step>,
    ) -> (
        Scripted,
        mpsc::UnboundedReceiver<(String, tokio::time::Instant)>,
    ) {
        let (started, rx) = mpsc::unbounded_channel();
        let s = Scripted {
            script: Arc::new(Mutex::new(script.into())),
            started,
        };
        (s, rx)
    }

    /// Runs one attempt.
    pub async fn execute(&self, event: &Event) -> Result<Outcome, ActionError> {
        let _ = self
            .started
            .send((event.id().to_string(), tokio::time::Instant::now()));
        let step = self.script.lock().unwrap().pop_front();
        let (took, result) = step.unwrap_or((Duration::ZERO, Ok(())));
        tokio::time::sleep(took).await;
        result.map(|()| Outcome {
            output: None,
            detail: "scripted".into(),
        })
    }
}
