//! Restart robustness (DESIGN §4, §6): the volume registry lives on disk, so a restarted plugin
//! still knows every volume; Docker's `volume ls`/`inspect` keep working and the next container
//! works. A session mounted across a restart keeps serving its container and is committed by the
//! new process when the container stops.

use super::harness::{expect_status_value, Scope};
use super::plugin::Backend;
use super::Harness;
use anyhow::{ensure, Result};

/// Stops and restarts the plugin between two containers.
pub fn restart_between(h: &Harness, backend: Backend) -> Result<()> {
    let mut s = Scope::with_plugin(h, &format!("restart-{}", backend.as_str()), backend, None)?;
    s.sh(
        Some((&s.vol("rs-one"), "/cache", false)),
        &[],
        "echo a > /cache/a.txt",
    )?
    .check()?;
    s.plugin().wait_session_ended("rs", "one")?;
    ensure!(
        s.plugin().wait_latest("rs", |l| l == "one")? == "one",
        "rs-one did not commit before the restart"
    );

    s.plugin_mut().restart()?;
    let name = s.plugin().name.clone();

    let ls = h.docker_ok(&[
        "volume",
        "ls",
        "--filter",
        &format!("driver={name}"),
        "--format",
        "{{.Name}}",
    ])?;
    ensure!(
        ls.lines().any(|l| l == "rs-one"),
        "after a plugin restart docker volume ls does not list rs-one:\n{ls}"
    );
    let drv = h.docker_ok(&["volume", "inspect", "--format", "{{.Driver}}", "rs-one"])?;
    ensure!(
        drv.trim() == name,
        "rs-one's driver after restart is {drv:?}, expected {name}"
    );
    let st = s.status("rs-one")?;
    expect_status_value(
        "docker volume inspect rs-one .Status after restart",
        &st,
        "rs",
    )?;

    let out = s
        .sh(
            Some((&s.vol("rs-two"), "/cache", false)),
            &[],
            "cat /cache/a.txt && echo b > /cache/b.txt",
        )?
        .check()?;
    ensure!(
        out.stdout == "a\n",
        "rs-two after restart read {:?}, expected \"a\\n\"",
        out.stdout
    );
    s.plugin().wait_session_ended("rs", "two")?;
    ensure!(
        s.plugin().wait_latest("rs", |l| l == "two")? == "two",
        "rs-two did not commit after the restart"
    );

    // the volume known from before the restart is reusable; its layer name `one` is taken
    let out = s
        .sh(
            Some((&s.vol("rs-one"), "/cache", false)),
            &[],
            "cat /cache/a.txt /cache/b.txt && echo c > /cache/c.txt",
        )?
        .check()?;
    ensure!(
        out.stdout == "a\nb\n",
        "reused rs-one read {:?}",
        out.stdout
    );
    s.plugin().wait_session_ended("rs", "one")?;
    let latest = s.plugin().wait_latest("rs", |l| l != "two")?;
    ensure!(
        latest != "one" && latest != "two" && latest.starts_with("one"),
        "second commit of session id `one` should get a unique layer name derived from `one`; \
         latest is {latest:?}"
    );
    h.docker_ok(&["volume", "rm", "rs-one"])?;
    s.ensure_plugin_alive()
}

/// Restarts the plugin while a container has its volume mounted.
pub fn restart_while_mounted(h: &Harness, backend: Backend) -> Result<()> {
    let mut s = Scope::with_plugin(
        h,
        &format!("restart-mounted-{}", backend.as_str()),
        backend,
        None,
    )?;
    let v = s.vol("rm-one");
    s.start("rm-one", &v, "/cache", &[])?;
    s.exec_ok("rm-one", "echo a > /cache/a.txt")?;

    s.plugin_mut().restart()?;

    let seen = s.exec_ok(
        "rm-one",
        "cat /cache/a.txt && echo b > /cache/b.txt && ls /cache",
    )?;
    ensure!(
        seen == "a\na.txt\nb.txt\n",
        "the running container's volume after a plugin restart shows {seen:?}"
    );
    let st = s.status("rm-one")?;
    expect_status_value(
        "docker volume inspect rm-one .Status after restart",
        &st,
        "rm",
    )?;
    s.stop("rm-one")?;
    s.plugin().wait_session_ended("rm", "one")?;
    let latest = s.plugin().wait_latest("rm", |l| l == "one")?;
    ensure!(
        latest == "one",
        "the session mounted across the restart did not commit at its Unmount: latest={latest:?}"
    );
    let out = s
        .sh(
            Some((&s.vol("rm-two"), "/cache", false)),
            &[],
            "cat /cache/a.txt /cache/b.txt",
        )?
        .check()?;
    ensure!(out.stdout == "a\nb\n", "rm-two read {:?}", out.stdout);
    s.ensure_plugin_alive()
}

/// Restarts dockerd itself (SIGTERM, as on a host shutdown, then start on the same data) while
/// a container has a cachedriver volume mounted: Docker's volume database and our registry must
/// agree afterwards, the stopped container's session must have been committed (Docker unmounts
/// the volumes of the containers it stops at shutdown), the same container can be started again
/// (same container ID: Docker reuses its Mount ID) and the next container sees everything.
pub fn dockerd_restart(h: &Harness, backend: Backend) -> Result<()> {
    let mut s = Scope::with_plugin(
        h,
        &format!("dockerd-restart-{}", backend.as_str()),
        backend,
        None,
    )?;
    s.sh(
        Some((&s.vol("dr-one"), "/cache", false)),
        &[],
        "echo a > /cache/a.txt",
    )?
    .check()?;
    s.plugin().wait_session_ended("dr", "one")?;
    s.start("dr-run", &s.vol("dr-two"), "/cache", &[])?;
    s.exec_ok("dr-run", "echo b > /cache/b.txt")?;

    h.dockerd.restart()?;

    let name = s.plugin().name.clone();
    let ls = h.docker_ok(&[
        "volume",
        "ls",
        "--filter",
        &format!("driver={name}"),
        "--format",
        "{{.Name}}",
    ])?;
    for v in ["dr-one", "dr-two"] {
        ensure!(
            ls.lines().any(|l| l == v),
            "after a dockerd restart docker volume ls does not list {v}:\n{ls}"
        );
    }
    s.plugin().wait_session_ended("dr", "two")?;
    let latest = s.plugin().wait_latest("dr", |l| l == "two")?;
    ensure!(
        latest == "two",
        "the container stopped by dockerd's shutdown did not commit its session: latest={latest:?}"
    );

    h.docker_ok(&["start", "dr-run"])?;
    let out = s.exec_ok(
        "dr-run",
        "cat /cache/a.txt /cache/b.txt && echo c > /cache/c.txt",
    )?;
    ensure!(
        out == "a\nb\n",
        "the restarted container (same ID, new session) read {out:?}"
    );
    s.stop("dr-run")?;
    s.plugin().wait_session_ended("dr", "two")?;
    let out = s
        .sh(
            Some((&s.vol("dr-three"), "/cache", false)),
            &[],
            "cat /cache/a.txt /cache/b.txt /cache/c.txt",
        )?
        .check()?;
    ensure!(
        out.stdout == "a\nb\nc\n",
        "after the dockerd restart dr-three read {:?}",
        out.stdout
    );
    s.ensure_plugin_alive()
}
