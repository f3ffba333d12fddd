//! Session semantics beyond the walkthrough (DESIGN §4):
//! - a volume used by two running containers is ONE session: both see each other's writes,
//!   the first container's stop commits nothing, the last one's commits everything;
//! - Remove of a mounted volume is refused with a clear error (asked directly over the plugin
//!   socket: Docker refuses `volume rm` of an in-use volume before asking the driver);
//! - several concurrent `commit=merge` writers stopped at the same moment all survive, and the
//!   cache's layer chain holds each of their layers;
//! - driver-wide commit defaults from the command line and the environment, and `-o commit=`
//!   overriding them.

use super::daemon::{http_over_unix, Dockerd};
use super::harness::{expect_contains, expect_status_value, Harness, Scope};
use super::plugin::{Backend, CommitDefault, Plugin};
use super::util;
use anyhow::{bail, ensure, Context, Result};
use std::time::Duration;

/// Number of concurrent merge-mode writers.
const WRITERS: usize = 4;

/// Layer names from `latest` down to the root, following `layers.<name>.parent`.
fn chain(p: &Plugin, cache: &str) -> Result<Vec<String>> {
    let st = p.cache_state(cache)?;
    let mut cur = p.latest(cache)?;
    let mut out = vec![cur.clone()];
    for _ in 0..1000 {
        match st.pointer(&format!("/layers/{cur}/parent")) {
            Some(serde_json::Value::String(parent)) => {
                cur = parent.clone();
                out.push(cur.clone());
            }
            Some(serde_json::Value::Null) | None => return Ok(out),
            Some(other) => bail!("layers.{cur}.parent is not a string: {other}"),
        }
    }
    bail!("layer chain of {cache} does not end: {st}")
}

/// One Docker volume-protocol call straight to the plugin; returns the decoded JSON body.
fn plugin_call(p: &Plugin, endpoint: &str, body: &str) -> Result<serde_json::Value> {
    let resp = http_over_unix(&p.sock, "POST", endpoint, body)?;
    let json = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .with_context(|| format!("no HTTP body in {resp:?}"))?;
    // tolerate chunked framing: the JSON object is between the outer braces
    let start = json
        .find('{')
        .with_context(|| format!("no JSON in {resp:?}"))?;
    let end = json
        .rfind('}')
        .with_context(|| format!("no JSON in {resp:?}"))?;
    serde_json::from_str(&json[start..=end]).with_context(|| format!("decoding {resp:?}"))
}

/// Runs the session scenarios on a fresh plugin with `backend`.
pub fn sessions(h: &Harness, backend: Backend) -> Result<()> {
    let mut s = Scope::with_plugin(h, &format!("sessions-{}", backend.as_str()), backend, None)?;
    shared_volume(&s)?;
    concurrent_merge(&s, &h.dockerd)?;
    s.ensure_plugin_alive()
}

fn shared_volume(s: &Scope) -> Result<()> {
    let p = s.plugin();
    let v = s.vol("sh-both");
    s.start("sh-a", &v, "/cache", &[])?;
    s.start("sh-b", &v, "/cache", &[])?;
    s.exec_ok("sh-a", "echo a > /cache/a.txt")?;
    let seen = s.exec_ok("sh-b", "cat /cache/a.txt")?;
    ensure!(
        seen == "a\n",
        "two containers on the same volume should share one session; the second read {seen:?}"
    );

    let r = plugin_call(p, "/VolumeDriver.Remove", r#"{"Name":"sh-both"}"#)?;
    let err = r.get("Err").and_then(|e| e.as_str()).unwrap_or("");
    ensure!(
        !err.is_empty(),
        "VolumeDriver.Remove of a mounted volume was accepted: {r}"
    );

    s.stop("sh-a")?;
    ensure!(
        util::is_mountpoint(&p.merged("sh", "both")),
        "the session ended when the first of two containers stopped"
    );
    ensure!(
        p.latest("sh")? == "0",
        "the first of two containers sharing a session committed at its stop (latest={})",
        p.latest("sh")?
    );
    let out = s.exec_ok(
        "sh-b",
        "cat /cache/a.txt && echo b > /cache/b.txt && echo ok",
    )?;
    ensure!(
        out == "a\nok\n",
        "after the first container stopped the second sees {out:?}"
    );
    s.stop("sh-b")?;
    p.wait_session_ended("sh", "both")?;
    let latest = p.wait_latest("sh", |l| l == "both")?;
    ensure!(
        latest == "both",
        "the shared session should commit once as layer `both`; latest={latest:?}"
    );
    let out = s
        .sh(
            Some((&s.vol("sh-next"), "/cache", false)),
            &[],
            "cat /cache/a.txt /cache/b.txt",
        )?
        .check()?;
    ensure!(out.stdout == "a\nb\n", "sh-next read {:?}", out.stdout);
    Ok(())
}

fn concurrent_merge(s: &Scope, dockerd: &Dockerd) -> Result<()> {
    let p = s.plugin();
    let names: Vec<String> = (1..=WRITERS).map(|i| format!("cm-w{i}")).collect();
    for n in &names {
        s.h.docker_ok(&[
            "volume",
            "create",
            "--driver",
            &p.name,
            "-o",
            "commit=merge",
            n,
        ])?;
        s.track(&s.vol(n));
        s.start(n, &s.vol(n), "/cache", &[])?;
    }
    for (i, n) in names.iter().enumerate() {
        s.exec_ok(
            n,
            &format!("echo {i} > /cache/{n}.txt && echo {i} > /cache/last.txt"),
        )?;
    }
    // stop all at once: the commits race inside the plugin
    let results: Vec<Result<util::CmdOut>> = std::thread::scope(|sc| {
        let handles: Vec<_> = names
            .iter()
            .map(|n| {
                sc.spawn(move || {
                    util::run(
                        dockerd.command().args(["stop", "-t", "10", n]),
                        Duration::from_secs(60),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("docker stop thread panicked"))
            })
            .collect()
    });
    for r in results {
        r?.check()?;
    }
    for n in &names {
        s.h.docker_ok(&["rm", n])?;
        let id = n.split_once('-').map(|x| x.1).unwrap_or(n);
        p.wait_session_ended("cm", id)?;
    }
    let want: String = (0..WRITERS).map(|i| format!("{i}\n")).collect();
    let files: Vec<String> = names.iter().map(|n| format!("/cache/{n}.txt")).collect();
    let out = s
        .sh(
            Some((&s.vol("cm-check"), "/cache", false)),
            &[],
            &format!("cat {}; cat /cache/last.txt", files.join(" ")),
        )?
        .check()?;
    ensure!(
        out.stdout.starts_with(&want) && out.stdout.lines().count() == WRITERS + 1,
        "{WRITERS} concurrent merge writers stopped together should all survive; read {:?}",
        out.stdout
    );
    let ch = chain(p, "cm")?;
    for n in &names {
        let id = n.split_once('-').map(|x| x.1).unwrap_or(n);
        ensure!(
            ch.iter().any(|l| l == id),
            "layer chain of cache cm lacks writer {id}: {ch:?}"
        );
    }
    expect_contains("cachedriver ls", &p.ls()?.check()?.stdout, "cm")?;
    Ok(())
}

/// Driver-wide commit defaults: `--commit merge` on the command line, and `CACHEDRIVER_COMMIT=
/// discard` in the environment (how `docker plugin set` configures a managed plugin); a
/// volume's `-o commit=` overrides either.
pub fn driver_defaults(h: &Harness, backend: Backend) -> Result<()> {
    {
        let mut s = Scope::with_plugin(
            h,
            &format!("defaults-flag-{}", backend.as_str()),
            backend,
            Some(CommitDefault::Flag("merge".into())),
        )?;
        let p = s.plugin();
        s.start("df-one", &s.vol("df-one"), "/cache", &[])?;
        s.start("df-two", &s.vol("df-two"), "/cache", &[])?;
        s.exec_ok("df-one", "echo one > /cache/one.txt")?;
        s.exec_ok("df-two", "echo two > /cache/two.txt")?;
        expect_status_value("volume df-one .Status", &s.status("df-one")?, "merge")?;
        s.stop("df-one")?;
        p.wait_latest("df", |l| l == "one")?;
        s.stop("df-two")?;
        let latest = p.wait_latest("df", |l| l == "two")?;
        ensure!(latest == "two", "df-two did not commit: latest={latest:?}");
        let out = s
            .sh(
                Some((&s.vol("df-three"), "/cache", false)),
                &[],
                "cat /cache/one.txt /cache/two.txt",
            )?
            .check()?;
        ensure!(
            out.stdout == "one\ntwo\n",
            "with --commit merge both concurrent writers should survive; read {:?}",
            out.stdout
        );
        s.ensure_plugin_alive()?;
    }
    let mut s = Scope::with_plugin(
        h,
        &format!("defaults-env-{}", backend.as_str()),
        backend,
        Some(CommitDefault::Env("discard".into())),
    )?;
    let p = s.plugin();
    s.sh(
        Some((&s.vol("de-one"), "/cache", false)),
        &[],
        "echo one > /cache/one.txt",
    )?
    .check()?;
    p.wait_session_ended("de", "one")?;
    expect_status_value("volume de-one .Status", &s.status("de-one")?, "discard")?;
    let latest = p.latest("de")?;
    ensure!(
        latest == "0",
        "with CACHEDRIVER_COMMIT=discard nothing should be written back; latest={latest:?}"
    );
    h.docker_ok(&[
        "volume",
        "create",
        "--driver",
        &p.name,
        "-o",
        "commit=replace",
        "de-two",
    ])?;
    s.track(&s.vol("de-two"));
    s.sh(
        Some((&s.vol("de-two"), "/cache", false)),
        &[],
        "echo two > /cache/two.txt",
    )?
    .check()?;
    let latest = p.wait_latest("de", |l| l == "two")?;
    ensure!(
        latest == "two",
        "-o commit=replace should override the discard default; latest={latest:?}"
    );
    let out = s
        .sh(
            Some((&s.vol("de-three"), "/cache", false)),
            &[],
            "ls /cache",
        )?
        .check()?;
    ensure!(out.stdout == "two.txt\n", "de-three sees {:?}", out.stdout);
    s.ensure_plugin_alive()
}
