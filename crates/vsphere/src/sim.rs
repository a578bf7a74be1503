//! Starts govmomi's vCenter simulator (`vcsim/main.go`, built from Debian's
//! `golang-github-vmware-govmomi-dev`) for tests of this crate and of its users.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

/// A running simulator; stopped when dropped.
pub struct Simulator {
    child: Child,
    /// The SDK URL (`https://127.0.0.1:PORT/sdk`).
    pub url: String,
    /// SHA-1 thumbprint of its certificate.
    pub thumbprint: String,
}

static BUILD: Mutex<()> = Mutex::new(());

fn workspace_target() -> PathBuf {
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target")
}

/// The simulator binary, built once if missing (needs `go` and the govmomi sources).
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("VCSIM_BIN") {
        return PathBuf::from(p);
    }
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let bin = workspace_target().join("vcsim");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vcsim");
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let stale = match (modified(&bin), modified(&src.join("main.go"))) {
        (Some(b), Some(s)) => b < s,
        _ => true,
    };
    if stale {
        let status = Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(".")
            .current_dir(&src)
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOFLAGS", "-mod=mod")
            .status()
            .expect("cannot run `go`: install golang-go and golang-github-vmware-govmomi-dev (scripts/test.sh does)");
        assert!(status.success(), "building the vCenter simulator failed");
    }
    bin
}

impl Simulator {
    /// Starts a simulator on a free loopback port with user `user`, password `pass`.
    pub fn start() -> Simulator {
        Self::start_with(&[])
    }

    /// Starts a simulator with extra flags (e.g. `-session-idle-timeout=2s`, `-listen=…`).
    pub fn start_with(args: &[&str]) -> Simulator {
        let mut child = Command::new(binary())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the vCenter simulator");
        let out = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .expect("reading the simulator's address");
        let mut url = String::new();
        let mut thumbprint = String::new();
        for part in line.split_whitespace() {
            if let Some(u) = part.strip_prefix("URL=") {
                url = u.to_string();
            }
            if let Some(t) = part.strip_prefix("THUMBPRINT=") {
                thumbprint = t.to_string();
            }
        }
        assert!(
            !url.is_empty(),
            "the simulator did not print its URL: {line:?}"
        );
        Simulator {
            child,
            url,
            thumbprint,
        }
    }

    /// Stops it now.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.kill();
    }
}
