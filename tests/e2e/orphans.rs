//! Orphaned sessions against a real dockerd (issue 12 item 10, DESIGN §4 "Orphaned sessions"):
//! dockerd killed with SIGKILL while containers run sends no Unmount for the containers it loses.
//! After its restart, `docker start` of a lost container (same mount ID again) must work and its
//! stop must commit everything it wrote, before and after the crash; `docker volume rm` of the
//! volume of a lost container that was removed must work and commit that container's writes;
//! nothing of either session stays mounted.

use std::time::Duration;

use super::harness::Scope;
use super::plugin::Backend;
use super::{util, Harness};
use anyhow::{ensure, Result};

/// Kills dockerd -9 while two containers run, restarts it, and checks both lost sessions end.
pub fn dockerd_sigkill(h: &Harness, backend: Backend) -> Result<()> {
    let mut s = Scope::with_plugin(h, &format!("sigkill-{}", backend.as_str()), backend, None)?;
    let (run, gone) = ("dk-run-c", "dk-gone-c");
    let (va, vb) = (s.vol("dk-run"), s.vol("dk-gone"));
    s.start(run, &va, "/cache", &[])?;
    s.exec_ok(run, "echo a > /cache/a.txt")?;
    s.start(gone, &vb, "/cache", &[])?;
    s.exec_ok(gone, "echo b > /cache/b.txt")?;

    h.dockerd.kill_and_restart()?;

    // Without live-restore the restarted dockerd stops the containers it lost.
    for c in [run, gone] {
        util::wait_for(Duration::from_secs(60), &format!("{c} to stop"), || {
            h.docker(&["inspect", "--format", "{{.State.Running}}", c])
                .ok()
                .filter(|o| o.stdout.trim() == "false")
        })?;
    }

    // `docker start` of the lost container: Docker Mounts the same ID again.
    h.docker_ok(&["start", run])?;
    let out = s.exec_ok(run, "cat /cache/a.txt && echo c > /cache/c.txt")?;
    ensure!(
        out == "a\n",
        "the restarted lost container read {out:?}, expected its own write from before the crash"
    );
    s.stop(run)?;
    s.plugin().wait_session_ended("dk", "run")?;
    let root = s.plugin().root.clone();
    let layer = root.join("lower/dk/run");
    ensure!(
        layer.join("a.txt").exists() && layer.join("c.txt").exists(),
        "the stop of the restarted lost container did not commit both writes into {}; plugin log:\n{}",
        layer.display(),
        s.plugin().log_tail(40)
    );

    // The other lost container is removed; then its volume.
    h.docker_ok(&["rm", "-f", gone])?;
    let rm = h.docker(&["volume", "rm", "dk-gone"])?;
    ensure!(
        rm.success(),
        "docker volume rm of a lost and removed container's volume failed: {}\nplugin log:\n{}",
        rm.describe(),
        s.plugin().log_tail(40)
    );
    ensure!(
        root.join("lower/dk/gone/b.txt").exists(),
        "the removed orphan's writes were not committed"
    );

    let left: Vec<_> = util::mounts()
        .into_iter()
        .filter(|(m, _)| m.starts_with(root.join("merged")))
        .collect();
    ensure!(
        left.is_empty(),
        "still mounted after both sessions ended: {left:?}"
    );

    // And the cache works for the next container.
    let out = s
        .sh(
            Some((&s.vol("dk-next"), "/cache", false)),
            &[],
            "cat /cache/b.txt",
        )?
        .check()?;
    ensure!(
        out.stdout == "b\n",
        "the next container read {:?}",
        out.stdout
    );
    s.ensure_plugin_alive()
}

/// Restores the shared dockerd's default configuration (and restarts it) when dropped.
struct DefaultConfig<'h>(&'h Harness);

impl Drop for DefaultConfig<'_> {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.dockerd.dir.join("daemon.json"), "{}\n");
        if let Err(e) = self.0.dockerd.restart() {
            eprintln!("e2e: restarting dockerd with its default configuration: {e:#}");
        }
    }
}

/// With dockerd's `live-restore`, containers keep running (and keep their bind mount of the
/// view) across dockerd killed -9: their session must never be ended, a new container of the
/// volume joins it, `docker cp` into the surviving container still works, and the session
/// commits everything when the last container stops.
pub fn dockerd_sigkill_live_restore(h: &Harness, backend: Backend) -> Result<()> {
    let _default = DefaultConfig(h);
    std::fs::write(
        h.dockerd.dir.join("daemon.json"),
        "{\"live-restore\": true}\n",
    )?;
    h.dockerd.restart()?;
    let mut s = Scope::with_plugin(h, &format!("live-{}", backend.as_str()), backend, None)?;
    // Docker sends no Unmount at all for a live-restored container once a `docker cp` has
    // mounted and unmounted its ID (its in-memory count drops to 0 and the ID is forgotten):
    // only the sweep ends that session, so sweep often here.
    s.plugin_mut().env = vec![("CACHEDRIVER_SWEEP_INTERVAL".into(), "2".into())];
    s.plugin_mut().restart()?;
    let (c, d) = ("lr-c", "lr-d");
    let v = s.vol("lr-one");
    s.start(c, &v, "/cache", &[])?;
    s.exec_ok(c, "echo a > /cache/a.txt")?;

    h.dockerd.kill_and_restart()?;

    let running = h.docker_ok(&["inspect", "--format", "{{.State.Running}}", c])?;
    ensure!(
        running.trim() == "true",
        "live-restore: {c} did not survive dockerd's restart"
    );
    let root = s.plugin().root.clone();
    ensure!(
        util::is_mountpoint(&s.plugin().merged("lr", "one")),
        "the live container's session was ended"
    );
    // docker cp into the surviving container: Mount/Unmount of its (pre-restart) ID.
    let src = root.join("..").join("cp.txt");
    std::fs::write(&src, "cp\n")?;
    h.docker_ok(&["cp", &src.to_string_lossy(), &format!("{c}:/cache/cp.txt")])?;
    ensure!(
        util::is_mountpoint(&s.plugin().merged("lr", "one")),
        "docker cp into a live-restored container ended its session"
    );
    s.start(d, &v, "/cache", &[])?;
    let out = s.exec_ok(d, "cat /cache/a.txt /cache/cp.txt && echo b > /cache/b.txt")?;
    ensure!(
        out == "a\ncp\n",
        "a new container of the volume read {out:?}"
    );
    s.stop(d)?;
    ensure!(
        util::is_mountpoint(&s.plugin().merged("lr", "one")),
        "the session ended while {c} still runs"
    );
    let out = s.exec_ok(c, "cat /cache/b.txt")?;
    ensure!(out == "b\n", "{c} read {out:?}");
    s.stop(c)?;
    s.plugin()
        .wait_session_ended("lr", "one")
        .map_err(|e| anyhow::anyhow!("{e:#}; plugin log:\n{}", s.plugin().log_tail(30)))?;
    // The sweep unmounts first and commits right after: wait for the state to name the layer.
    let latest = s.plugin().wait_latest("lr", |l| l == "one")?;
    ensure!(
        latest == "one",
        "the session was not committed: latest={latest:?}"
    );
    let layer = root.join("lower/lr/one");
    for f in ["a.txt", "cp.txt", "b.txt"] {
        ensure!(
            layer.join(f).exists(),
            "{f} missing from the committed layer {}; plugin log:\n{}",
            layer.display(),
            s.plugin().log_tail(40)
        );
    }
    s.ensure_plugin_alive()
}
