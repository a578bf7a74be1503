//! `type: exec` — run a local program with the event (structured JSON) on stdin. The
//! program is killed when the attempt times out (the future is dropped: `kill_on_drop`).

use super::{ActionError, Outcome};
use cloudevents::{AttributesReader, Event};
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

/// Configuration of `type: exec`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// The program (absolute path or found on `PATH`).
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// The program's environment: only these, `PATH` and `REFLEX_EVENT_ID`,
    /// `REFLEX_EVENT_TYPE` (reflex's own environment, where its secrets may be, is not
    /// passed on).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub dir: Option<String>,
}

/// A compiled `exec` action.
#[derive(Debug)]
pub struct ExecAction {
    command: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    dir: Option<String>,
}

impl ExecAction {
    /// Checks the command is not empty.
    pub fn build(c: &ExecConfig) -> Result<ExecAction, String> {
        if c.command.trim().is_empty() {
            return Err("exec: `command` is empty".into());
        }
        Ok(ExecAction {
            command: c.command.clone(),
            args: c.args.clone(),
            env: c.env.clone(),
            dir: c.dir.clone(),
        })
    }

    /// Runs the program; a non-zero exit is an error carrying the end of stderr.
    pub async fn execute(&self, event: &Event) -> Result<Outcome, ActionError> {
        if super::dry_run() {
            return Ok(super::would(format!(
                "run `{}` with {} argument(s) and the event on stdin",
                self.command,
                self.args.len()
            )));
        }
        let mut cmd = tokio::process::Command::new(&self.command);
        cmd.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        cmd.args(&self.args)
            .envs(&self.env)
            .env("REFLEX_EVENT_ID", event.id())
            .env("REFLEX_EVENT_TYPE", event.ty())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(d) = &self.dir {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().map_err(|e| {
            let msg = format!("cannot start `{}`: {e}", self.command);
            if e.kind() == std::io::ErrorKind::NotFound
                || e.kind() == std::io::ErrorKind::PermissionDenied
            {
                ActionError::permanent(msg)
            } else {
                ActionError::transient(msg)
            }
        })?;
        let input = crate::event::to_json(event);
        // Output is read as it comes and only its end is kept, so a chatty program cannot
        // fill memory.
        let stdout = tokio::spawn(keep_tail(child.stdout.take()));
        let stderr = tokio::spawn(keep_tail(child.stderr.take()));
        if let Some(mut stdin) = child.stdin.take() {
            // A program that does not read stdin closes the pipe; that is not a failure.
            let _ = stdin.write_all(input.as_bytes()).await;
        }
        let status = child
            .wait()
            .await
            .map_err(|e| ActionError::transient(format!("waiting for `{}`: {e}", self.command)))?;
        let (stdout, stderr) = (
            stdout.await.unwrap_or_default(),
            stderr.await.unwrap_or_default(),
        );
        if status.success() {
            Ok(Outcome {
                output: None,
                detail: format!("exit 0: {}", stdout.describe()),
            })
        } else {
            Err(ActionError::transient(format!(
                "`{}` exited with {status}: {}",
                self.command,
                stderr.describe()
            )))
        }
    }
}

/// Bytes of a program's output kept (its end).
const KEEP_OUTPUT: usize = 2048;

/// The end of a stream, and how many bytes came before it.
#[derive(Default)]
struct Tail {
    kept: Vec<u8>,
    dropped: u64,
}

impl Tail {
    fn describe(&self) -> String {
        let text = String::from_utf8_lossy(&self.kept);
        let text = text.trim();
        if self.dropped > 0 {
            format!("(first {} bytes not kept) {text}", self.dropped)
        } else {
            text.to_string()
        }
    }
}

async fn keep_tail<R: tokio::io::AsyncRead + Unpin>(stream: Option<R>) -> Tail {
    use tokio::io::AsyncReadExt;
    let mut tail = Tail::default();
    let Some(mut stream) = stream else {
        return tail;
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.kept.extend_from_slice(&buf[..n]);
                if tail.kept.len() > KEEP_OUTPUT {
                    let cut = tail.kept.len() - KEEP_OUTPUT;
                    tail.kept.drain(..cut);
                    tail.dropped += cut as u64;
                }
            }
        }
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::{EventBuilder, EventBuilderV10};

    #[tokio::test]
    async fn the_program_gets_a_clean_environment() {
        std::env::set_var("REFLEX_TEST_EXEC_INHERITED", "hunter2");
        let a = ExecAction::build(&ExecConfig {
            command: "sh".into(),
            args: vec![
                "-c".into(),
                "echo \"[$REFLEX_TEST_EXEC_INHERITED][$GIVEN][$REFLEX_EVENT_ID]\"".into(),
            ],
            env: [("GIVEN".to_string(), "yes".to_string())].into(),
            dir: None,
        })
        .unwrap();
        let ev = EventBuilderV10::new()
            .id("e1")
            .source("/t")
            .ty("t")
            .build()
            .unwrap();
        let out = a.execute(&ev).await.unwrap();
        // `sh` was found on PATH; nothing else of reflex's environment reached it.
        assert_eq!(out.detail, "exit 0: [][yes][e1]");
    }

    #[tokio::test]
    async fn only_the_end_of_a_large_output_is_kept() {
        let a = ExecAction::build(&ExecConfig {
            command: "sh".into(),
            args: vec![
                "-c".into(),
                "head -c 50000000 /dev/zero | tr '\\0' x; echo END".into(),
            ],
            env: Default::default(),
            dir: None,
        })
        .unwrap();
        let ev = EventBuilderV10::new()
            .id("e2")
            .source("/t")
            .ty("t")
            .build()
            .unwrap();
        let out = a.execute(&ev).await.unwrap();
        assert!(
            out.detail
                .starts_with("exit 0: (first 49997956 bytes not kept) xxx"),
            "{}",
            &out.detail[..80]
        );
        assert!(
            out.detail.ends_with("xxxEND"),
            "{}",
            &out.detail[out.detail.len() - 20..]
        );
    }
}
