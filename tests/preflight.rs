//! `serve` refuses to start, with one line naming the missing piece and the fix, when the host
//! lacks what it needs: mount rights, a writable root, a socket directory. This line is what
//! `docker plugin enable` or the daemon log shows an operator.

use std::process::Command;

#[path = "support/probe.rs"]
mod probe;

use probe::exe;

/// Runs `serve` with `args` (through `prefix`, e.g. setpriv) and returns its exit status and
/// stderr; it must exit on its own, quickly.
fn serve_fails(prefix: &[&str], args: &[&str]) -> String {
    let mut cmd = if prefix.is_empty() {
        Command::new(exe())
    } else {
        let mut c = Command::new(prefix[0]);
        c.args(&prefix[1..]).arg(exe());
        c
    };
    cmd.arg("serve").args(args).env_remove("CACHEDRIVER_ROOT");
    let out = cmd.output().expect("running cachedriver serve");
    assert!(
        !out.status.success(),
        "serve {args:?} started although it should have refused"
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let last = err.lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("cachedriver: "),
        "one plain error line expected, got:\n{err}"
    );
    last
}

#[test]
fn refuses_a_root_that_cannot_be_made_and_an_unwritable_socket_dir() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let sock = d.path().join("s.sock");
    let bad_root = file.join("root");
    let line = serve_fails(
        &[],
        &[
            "--root",
            bad_root.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
        ],
    );
    assert!(
        line.contains("store root") && line.contains("--root"),
        "{line}"
    );
    let root = d.path().join("root");
    let bad_sock = file.join("s.sock");
    let line = serve_fails(
        &[],
        &[
            "--root",
            root.to_str().unwrap(),
            "--socket",
            bad_sock.to_str().unwrap(),
        ],
    );
    assert!(
        line.contains("socket directory") && line.contains("--socket"),
        "{line}"
    );
}

#[test]
fn refuses_without_cap_sys_admin() {
    if !nix::unistd::geteuid().is_root() || probe::which("setpriv").is_none() {
        probe::skip(
            "preflight",
            "needs root and setpriv (util-linux) to drop CAP_SYS_ADMIN",
        );
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let sock = d.path().join("s.sock");
    let line = serve_fails(
        &[
            "setpriv",
            "--inh-caps=-sys_admin",
            "--bounding-set=-sys_admin",
            "--",
        ],
        &[
            "--root",
            root.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
        ],
    );
    assert!(
        line.contains("CAP_SYS_ADMIN") && line.contains("managed plugin"),
        "{line}"
    );
    assert!(
        !sock.exists(),
        "no socket may be bound by a server that refused to start"
    );
}
