//! The Docker managed plugin (issue 13, DESIGN §8): `plugin/build.sh` builds the rootfs offline
//! from the binary under test and runs `docker plugin create`; the test enables it, runs the
//! seed walkthrough with `--volume-driver NAME`, disables it, switches it to the FUSE backend with
//! `docker plugin set`, enables it and runs the walkthrough again (`docker volume inspect` says
//! `fuse`). A cache and its volumes stay intact across disable/enable and a dockerd restart.

use super::harness::{expect_status_value, Harness, Scope};
use super::plugin::{Backend, Plugin};
use super::walkthrough;
use anyhow::{ensure, Context, Result};

/// Runs the managed-plugin scenario.
pub fn managed(h: &Harness) -> Result<()> {
    let name = format!("cdtm{}", std::process::id());
    let dir = h.run_dir.join("managed");
    let (plugin, enable_secs) = Plugin::managed(
        &dir,
        &name,
        Backend::Kernel,
        h.dockerd.command_factory(),
        &h.dockerd.dir.join("data"),
    )?;
    eprintln!("e2e: managed plugin {name}: docker plugin enable took {enable_secs:.2} s");
    let mut s = Scope::new(h, "managed");
    s.plugin = Some(plugin);

    // kernel backend (the default `auto` picks it here; set explicitly by the build step)
    walkthrough::walk(&s, h, Backend::Kernel)?;
    let keep = s.vol("keep-a");
    s.sh(
        Some((&keep, "/cache", false)),
        &[],
        "echo kept > /cache/k.txt",
    )?
    .check()?;
    s.plugin().wait_session_ended("keep", "a")?;

    // FUSE backend: settings change only while disabled
    s.plugin_mut().stop();
    s.plugin_mut().set("CACHEDRIVER_BACKEND=fuse")?;
    s.plugin_mut()
        .restart()
        .context("enabling the managed plugin with CACHEDRIVER_BACKEND=fuse")?;
    // the walkthrough expects fresh caches: forget all but `keep` (volumes first, then layers)
    let vols = h.docker_ok(&["volume", "ls", "--format", "{{.Name}}"])?;
    for v in vols.lines().filter(|v| !v.starts_with("keep-")) {
        let _ = h.docker(&["volume", "rm", "-f", v]);
    }
    let lower = s.plugin().root.join("lower");
    for e in std::fs::read_dir(&lower).with_context(|| format!("listing {}", lower.display()))? {
        let e = e?;
        if e.file_name() != "keep" {
            std::fs::remove_dir_all(e.path())
                .with_context(|| format!("resetting {}", e.path().display()))?;
        }
    }
    walkthrough::walk(&s, h, Backend::Fuse)?;
    let st = s.status("foo-one")?;
    expect_status_value("docker volume inspect foo-one (managed, fuse)", &st, "fuse")?;

    // the cache and its volumes survived disable/enable; then a dockerd restart
    check_keep(&s, h, "after disable/set/enable")?;
    h.dockerd.restart()?;
    crate::e2e::util::wait_for(
        std::time::Duration::from_secs(60),
        "the managed plugin to be enabled again after the dockerd restart",
        || {
            let o = h
                .docker(&["plugin", "inspect", "--format", "{{.Enabled}}", &name])
                .ok()?;
            (o.stdout.trim() == "true").then_some(())
        },
    )?;
    check_keep(&s, h, "after a dockerd restart")?;
    // the engine socket is mounted into the plugin: commit-on=success is accepted, and a failed
    // container's session is discarded
    h.docker_ok(&[
        "volume",
        "create",
        "--driver",
        &name,
        "-o",
        "commit-on=success",
        "keep-c",
    ])?;
    let out = s.sh(
        Some((&s.vol("keep-c"), "/cache", false)),
        &[],
        "echo no > /cache/k.txt; exit 3",
    )?;
    ensure!(!out.success(), "the failing container did not fail");
    s.plugin().wait_session_ended("keep", "c")?;
    check_keep(&s, h, "after a failed commit-on=success session")?;
    check_no_zombies()?;
    s.ensure_plugin_alive()
}

/// The plugin's `serve` is PID 1 of its container: the FUSE servers it started and that exited
/// must have been reaped (no `<defunct>` children left).
fn check_no_zombies() -> Result<()> {
    let stat = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
    let mut inits = Vec::new();
    let mut zombies = Vec::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.starts_with(b"/usr/bin/cachedriver\0serve") {
            inits.push(pid.clone());
        }
        if let Some(st) = stat(&pid) {
            // pid (comm) state ppid ...
            let rest: Vec<&str> = st
                .rsplit_once(')')
                .map(|(_, r)| r)
                .unwrap_or("")
                .split_whitespace()
                .collect();
            if rest.first() == Some(&"Z") {
                zombies.push((pid, rest.get(1).map(|s| s.to_string()).unwrap_or_default()));
            }
        }
    }
    let ours: Vec<_> = zombies
        .iter()
        .filter(|(_, ppid)| inits.contains(ppid))
        .collect();
    ensure!(
        ours.is_empty(),
        "zombie children of the managed plugin's processes {inits:?}: {ours:?}"
    );
    Ok(())
}

fn check_keep(s: &Scope, h: &Harness, when: &str) -> Result<()> {
    let ls = h.docker_ok(&["volume", "ls", "--format", "{{.Name}} {{.Driver}}"])?;
    ensure!(
        ls.lines().any(|l| l.starts_with("keep-a ")),
        "{when}: docker volume ls lost keep-a:\n{ls}"
    );
    let out = s
        .sh(
            Some((&s.vol("keep-b"), "/cache", false)),
            &[],
            "cat /cache/k.txt",
        )?
        .check()?;
    ensure!(
        out.stdout == "kept\n",
        "{when}: a new session of cache keep read {:?}",
        out.stdout
    );
    s.plugin().wait_session_ended("keep", "b")?;
    Ok(())
}
