//! The Debian package: installed into this machine with dpkg, its binary checks the
//! installed configuration, systemd accepts its unit, the man page and completions are in
//! place, and it is removed again.

use std::process::Command;

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} could not be run: {e}"));
    eprintln!(
        "$ {cmd} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `dpkg` as root: directly when this is root, else through sudo.
fn dpkg(args: &[&str]) -> std::process::Output {
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() == "0" {
        run("dpkg", args)
    } else {
        let mut all = vec!["dpkg"];
        all.extend_from_slice(args);
        run("sudo", &all)
    }
}

#[test]
#[ignore = "installs a .deb into this machine: scripts/test.sh builds the package and runs this alone (REFLEX_TEST_DEB)"]
fn the_package_installs_and_checks_its_config() {
    let deb = std::env::var("REFLEX_TEST_DEB").expect("REFLEX_TEST_DEB names the .deb to install");
    assert!(dpkg(&["-i", &deb]).status.success(), "dpkg -i {deb}");
    let version = run("/usr/bin/reflex", &["--version"]);
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
    // The installed configuration is the quickstart with its store in the state directory.
    let config = std::fs::read_to_string("/etc/reflex/reflex.yaml").unwrap();
    assert!(
        config.contains("path: /var/lib/reflex/reflex.db"),
        "{config}"
    );
    assert!(
        run(
            "/usr/bin/reflex",
            &["check", "-c", "/etc/reflex/reflex.yaml"]
        )
        .status
        .success(),
        "the installed binary accepts the installed configuration"
    );
    let status = String::from_utf8_lossy(&run("dpkg", &["-s", "reflex"]).stdout).to_string();
    assert!(
        status.contains("/etc/reflex/reflex.yaml"),
        "a conffile: {status}"
    );
    let unit = "/lib/systemd/system/reflex.service";
    let text = std::fs::read_to_string(unit).unwrap();
    for line in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "StateDirectory=reflex",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(text.contains(line), "{line} in the unit");
    }
    if std::path::Path::new("/usr/bin/systemd-analyze").exists() {
        let v = run("systemd-analyze", &["verify", unit]);
        assert!(v.status.success(), "systemd-analyze verify {unit}");
    }
    // Listed in the package (a minimal image may tell dpkg to leave /usr/share/man out), and
    // where installed, a man page in roff.
    let listing = String::from_utf8_lossy(&run("dpkg-deb", &["-c", &deb]).stdout).to_string();
    for f in [
        "./usr/share/man/man1/reflex.1.gz",
        "./usr/share/bash-completion/completions/reflex",
        "./usr/share/zsh/vendor-completions/_reflex",
        "./usr/share/fish/vendor_completions.d/reflex.fish",
        "./lib/systemd/system/reflex.service",
        "./usr/bin/reflex",
    ] {
        assert!(listing.contains(f), "{f} in the package");
    }
    let man = "/usr/share/man/man1/reflex.1.gz";
    if std::path::Path::new(man).exists() {
        let text = String::from_utf8_lossy(&run("zcat", &[man]).stdout).to_string();
        assert!(text.contains(".TH reflex 1"), "a man page in roff: {text}");
    }
    assert!(dpkg(&["--purge", "reflex"]).status.success());
    assert!(!std::path::Path::new("/usr/bin/reflex").exists());
}
