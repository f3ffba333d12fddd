//! Store permissions through real containers (issue 12 item 4, DESIGN §3): a container commits
//! a setuid-root busybox and a world-readable secret into a cache, another keeps a session live
//! with the same; a host user (uid 65534, via `setpriv`) can stat, read or run none of it under
//! the plugin's `lower/`, `upper/`, `work/` or `merged/`, while a non-root user INSIDE the
//! container still reads the secret through the view.

use super::harness::Scope;
use super::plugin::Backend;
use super::util;
use anyhow::{ensure, Result};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// What uid 65534 on the host could do with `p` (empty: nothing).
fn host_user_reaches(p: &Path) -> Result<Vec<String>> {
    let s = p.to_string_lossy().to_string();
    let mut got = vec![];
    for (what, args) in [
        ("stat", vec!["stat", s.as_str()]),
        ("cat", vec!["cat", s.as_str()]),
        // Through a shell: setpriv still holds its capabilities at its own execve.
        ("exec", vec!["sh", "-c", "exec \"$0\" id", s.as_str()]),
    ] {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(&args);
        let out = util::run(&mut cmd, Duration::from_secs(20))?;
        // busybox run under another name fails as an applet, after the exec worked: only a
        // refused exec counts as not reached.
        let refused =
            !out.success() && (what != "exec" || out.stderr.contains("Permission denied"));
        if !refused {
            got.push(format!("{what} {s}: {}", out.stdout.trim()));
        }
    }
    Ok(got)
}

/// Runs the scenario on a fresh plugin with `backend`.
pub fn store_perms(h: &super::Harness, backend: Backend) -> Result<()> {
    let mut s = Scope::with_plugin(h, &format!("perms-{}", backend.as_str()), backend, None)?;
    let plant = "cp /bin/busybox /data/suid && chmod 4755 /data/suid && \
                 echo s3cret > /data/secret && chmod 644 /data/secret && echo ok";
    let out = s
        .sh(Some((&s.vol("sp-a"), "/data", false)), &[], plant)?
        .check()?;
    ensure!(out.stdout.contains("ok"), "planting: {}", out.stdout);
    let p = s.plugin();
    // Docker may mount once at create to copy image content: that commits `a`, the run `a.1`.
    p.wait_session_ended("sp", "a")?;
    let layer = p.latest("sp")?;
    ensure!(
        layer.starts_with('a'),
        "the run committed no layer: latest {layer}"
    );
    s.start("sp-live", &s.vol("sp-b"), "/data", &[])?;
    s.exec_ok("sp-live", plant)?;

    let inside =
        s.h.docker(&["exec", "-u", "65534", "sp-live", "cat", "/data/secret"])?;
    ensure!(
        inside.success() && inside.stdout == "s3cret\n",
        "a non-root user inside the container reads the view: {}",
        inside.describe()
    );

    let root = p.root.clone();
    let mut reached = vec![];
    let committed = format!("lower/sp/{layer}");
    for dir in [committed.as_str(), "upper/sp/b", "merged/sp/b"] {
        for f in ["suid", "secret"] {
            let path = root.join(dir).join(f);
            ensure!(
                std::fs::symlink_metadata(&path).is_ok(),
                "{} should exist (root sees it)",
                path.display()
            );
            reached.extend(host_user_reaches(&path)?);
        }
    }
    for d in ["lower", "upper", "work", "merged", "volumes", "work/sp/b"] {
        reached.extend(
            host_user_reaches(&root.join(d))?
                .into_iter()
                .filter(|g| !g.starts_with("exec")),
        );
    }
    ensure!(
        reached.is_empty(),
        "a host user reached what containers wrote: {reached:?}"
    );
    s.stop("sp-live")?;
    s.plugin().wait_latest("sp", |l| l.starts_with('b'))?;
    s.ensure_plugin_alive()
}
