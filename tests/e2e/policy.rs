//! `commit-on=success` against a real dockerd (issue 14): the plugin follows dockerd's event
//! stream (`--engine-socket`); a container that exits 3 or is `docker kill`ed leaves the cache as
//! it was, one that exits 0 commits, two containers sharing a session where one fails discard it,
//! and after a dockerd restart the stream is followed again and the next decisions are right.
//! Create refuses `commit-on=success` when the engine socket does not answer, and bad values.

use super::harness::{expect_contains, Harness, Scope};
use super::plugin::Backend;
use anyhow::{ensure, Result};

/// Runs the scenario on `backend`.
pub fn commit_on_success(h: &Harness, backend: Backend) -> Result<()> {
    let mut s = Scope::with_plugin(h, &format!("policy-{}", backend.as_str()), backend, None)?;
    let sock = h.dockerd.sock.display().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let metrics = format!("127.0.0.1:{port}");
    s.plugin_mut()
        .restart_with(&["--engine-socket", &sock, "--metrics", &metrics])?;
    let name = s.plugin().name.clone();
    let create = |v: &str| -> Result<()> {
        h.docker_ok(&[
            "volume",
            "create",
            "--driver",
            &name,
            "-o",
            "commit-on=success",
            v,
        ])?;
        Ok(())
    };
    let latest = |s: &Scope| s.plugin().latest("pol").unwrap_or_default();

    // exit 0 commits
    create("pol-good")?;
    s.sh(
        Some((&s.vol("pol-good"), "/cache", false)),
        &[],
        "echo good > /cache/good.txt",
    )?
    .check()?;
    s.plugin().wait_session_ended("pol", "good")?;
    ensure!(
        latest(&s) == "good",
        "exit 0 under commit-on=success did not commit: latest={}",
        latest(&s)
    );

    // exit 3 leaves the cache as it was
    create("pol-bad")?;
    let out = s.sh(
        Some((&s.vol("pol-bad"), "/cache", false)),
        &[],
        "echo bad > /cache/bad.txt; exit 3",
    )?;
    ensure!(
        !out.success(),
        "the failing container did not fail: {}",
        out.describe()
    );
    s.plugin().wait_session_ended("pol", "bad")?;
    ensure!(
        latest(&s) == "good",
        "exit 3 under commit-on=success committed: latest={}",
        latest(&s)
    );

    // docker kill counts as failure (exit code 137)
    create("pol-kill")?;
    s.start("pol-k", &s.vol("pol-kill"), "/cache", &[])?;
    s.exec_ok("pol-k", "echo killed > /cache/killed.txt")?;
    h.docker_ok(&["kill", "pol-k"])?;
    s.plugin().wait_session_ended("pol", "kill")?;
    ensure!(
        latest(&s) == "good",
        "a killed container's session committed: latest={}",
        latest(&s)
    );
    let _ = h.docker(&["rm", "-f", "pol-k"]);

    // two containers share one session; one fails -> discarded
    create("pol-shared")?;
    s.start("pol-a", &s.vol("pol-shared"), "/cache", &[])?;
    s.exec_ok("pol-a", "echo a > /cache/a.txt")?;
    let out = s.sh(
        Some((&s.vol("pol-shared"), "/cache", false)),
        &[],
        "echo b > /cache/b.txt; exit 3",
    )?;
    ensure!(!out.success(), "the failing sharer did not fail");
    s.stop("pol-a")?;
    s.plugin().wait_session_ended("pol", "shared")?;
    ensure!(
        latest(&s) == "good",
        "a session shared with a failed container committed: latest={}",
        latest(&s)
    );

    // the stream is followed again after dockerd restarts
    h.dockerd.restart()?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    create("pol-after")?;
    let out = s.sh(
        Some((&s.vol("pol-after"), "/cache", false)),
        &[],
        "echo x > /cache/after.txt; exit 3",
    )?;
    ensure!(!out.success(), "the failing container did not fail");
    s.plugin().wait_session_ended("pol", "after")?;
    ensure!(
        latest(&s) == "good",
        "after a dockerd restart a failed session committed: latest={}",
        latest(&s)
    );
    create("pol-after2")?;
    s.sh(
        Some((&s.vol("pol-after2"), "/cache", false)),
        &[],
        "echo y > /cache/after2.txt",
    )?
    .check()?;
    s.plugin().wait_session_ended("pol", "after2")?;
    ensure!(
        latest(&s) == "after2",
        "after a dockerd restart a good session did not commit: latest={}",
        latest(&s)
    );
    let view = s
        .sh(
            Some((&s.vol("pol-view"), "/cache", false)),
            &[],
            "ls /cache",
        )?
        .check()?
        .stdout;
    for f in ["bad.txt", "killed.txt", "a.txt", "b.txt", "after.txt"] {
        ensure!(
            !view.lines().any(|l| l == f),
            "{f} reached the cache: {view}"
        );
    }
    expect_contains("the cache after the good sessions", &view, "after2.txt")?;

    // the discards were decisions from the engine's exit codes, not the unknown-outcome default
    let log = std::fs::read_to_string(&s.plugin().log).unwrap_or_default();
    for code in ["exit_code=3", "exit_code=137"] {
        ensure!(
            log.lines()
                .any(|l| l.contains("a container failed") && l.contains(code)),
            "the plugin log has no discard decision with {code}"
        );
    }
    ensure!(
        !log.contains("is unknown"),
        "a decision fell back to --commit-on-unknown although dockerd's events were followed"
    );

    // the numbers an operator watches, scraped with curl and parsed
    let text = super::util::run(
        std::process::Command::new("curl").args(["-sf", &format!("http://{metrics}/metrics")]),
        std::time::Duration::from_secs(20),
    )?
    .check()?
    .stdout;
    let value = |name: &str, labels: &str| -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(k, _)| k.starts_with(name) && labels.split(',').all(|lb| k.contains(lb)))
            .filter_map(|(_, v)| v.parse::<f64>().ok())
            .sum()
    };
    let discarded = value(
        "cachedriver_sessions_ended_total",
        "cache=\"pol\",outcome=\"discarded\"",
    );
    let committed = value(
        "cachedriver_sessions_ended_total",
        "cache=\"pol\",outcome=\"committed\"",
    );
    let started = value("cachedriver_sessions_started_total", "cache=\"pol\"");
    let misses = value("cachedriver_sessions_started_total", "result=\"miss\"");
    ensure!(
        discarded >= 4.0 && committed >= 2.0 && started >= 7.0 && misses >= 1.0,
        "metrics: discarded={discarded} committed={committed} started={started} misses={misses}:\n{text}"
    );
    ensure!(
        value("cachedriver_unmount_seconds_count", "") >= 6.0,
        "no unmount latency samples:\n{text}"
    );

    // refused at Create: a bad value, and success without a reachable engine
    let r = h.docker(&[
        "volume",
        "create",
        "--driver",
        &name,
        "-o",
        "commit-on=maybe",
        "pol-x",
    ])?;
    ensure!(!r.success(), "commit-on=maybe was accepted");
    expect_contains(
        "Create with commit-on=maybe",
        &r.stderr,
        "commit-on=always or commit-on=success",
    )?;
    s.plugin_mut()
        .restart_with(&["--engine-socket", "/nonexistent/docker.sock"])?;
    let r = h.docker(&[
        "volume",
        "create",
        "--driver",
        &name,
        "-o",
        "commit-on=success",
        "pol-y",
    ])?;
    ensure!(
        !r.success(),
        "commit-on=success was accepted without an engine socket"
    );
    expect_contains(
        "Create with commit-on=success and no engine",
        &r.stderr,
        "--engine-socket",
    )?;
    s.ensure_plugin_alive()
}
