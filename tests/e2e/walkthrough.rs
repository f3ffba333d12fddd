//! The seed project's walkthrough as a test (DESIGN §4, §9): concurrent sessions `foo-one` and
//! `foo-two` are isolated from each other; after `foo-one` stops, `foo-three` sees its work and
//! `cache-state.json` names layer `one` latest; in `replace` mode the last to stop wins
//! wholesale; `merge` keeps concurrent writers' work; `discard` writes nothing back; `-o cache=`
//! overrides the name split; invalid names and options are refused with a helpful message.
//! `docker volume inspect` and `cachedriver ls` report what is going on.
//!
//! Parameterised by backend: the same walkthrough runs on the kernel and the FUSE backend.

use super::harness::{expect_contains, expect_lacks, expect_status_value, Harness, Scope};
use super::plugin::{Backend, Plugin};
use anyhow::{bail, ensure, Context, Result};

/// `layers.<layer>.parent` from a cache's state (`None` for a null parent).
fn parent_of(p: &Plugin, cache: &str, layer: &str) -> Result<Option<String>> {
    let st = p.cache_state(cache)?;
    let l = st
        .pointer(&format!("/layers/{layer}"))
        .with_context(|| format!("cache-state.json of {cache} has no layers.{layer}: {st}"))?;
    match l.get("parent") {
        Some(serde_json::Value::Null) | None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("layers.{layer}.parent of {cache} is not a string: {other}"),
    }
}

fn expect_latest(p: &Plugin, cache: &str, want: &str, why: &str) -> Result<()> {
    let got = p.wait_latest(cache, |l| l == want)?;
    ensure!(
        got == want,
        "{why}: lower/{cache}/cache-state.json says latest={got:?}, expected {want:?}; state: {}",
        p.cache_state(cache)
            .map(|v| v.to_string())
            .unwrap_or_default()
    );
    Ok(())
}

fn expect_parent(p: &Plugin, cache: &str, layer: &str, want: Option<&str>) -> Result<()> {
    let got = parent_of(p, cache, layer)?;
    ensure!(
        got.as_deref() == want,
        "layers.{layer}.parent of cache {cache} is {got:?}, expected {want:?}"
    );
    Ok(())
}

/// Runs the walkthrough on a fresh plugin instance with `backend`.
pub fn walkthrough(h: &Harness, backend: Backend) -> Result<()> {
    let mut s = Scope::with_plugin(h, &format!("walk-{}", backend.as_str()), backend, None)?;
    walk(&s, h, backend)?;
    s.ensure_plugin_alive()
}

/// The walkthrough itself, on the scope's plugin (legacy or managed) with a fresh cache `foo`.
pub fn walk(s: &Scope, h: &Harness, backend: Backend) -> Result<()> {
    let p = s.plugin();
    let name = p.name.clone();
    let foo_vol = |id: &str| s.vol(&format!("foo-{id}"));

    // concurrent sessions, isolated while running
    s.start("w-one", &foo_vol("one"), "/cache", &[])?;
    s.start("w-two", &foo_vol("two"), "/cache", &[])?;
    s.exec_ok("w-one", "echo one > /cache/one.txt")?;
    s.exec_ok("w-two", "echo two > /cache/two.txt")?;
    let l1 = s.exec_ok("w-one", "ls -a /cache")?;
    expect_contains("foo-one's view", &l1, "one.txt")?;
    expect_lacks("foo-one's view while foo-two runs", &l1, "two.txt")?;
    let l2 = s.exec_ok("w-two", "ls -a /cache")?;
    expect_contains("foo-two's view", &l2, "two.txt")?;
    expect_lacks("foo-two's view while foo-one runs", &l2, "one.txt")?;

    // first use created the empty layer 0
    expect_latest(p, "foo", "0", "before any commit")?;
    expect_parent(p, "foo", "0", None)?;
    for dir in ["upper/foo/one", "work/foo/one", "merged/foo/one"] {
        ensure!(
            p.root.join(dir).is_dir(),
            "live session foo-one has no {} under the plugin root",
            dir
        );
    }

    let st_mounted = s.status("foo-one")?;
    for want in ["foo", "replace", backend.as_str(), "0"] {
        expect_status_value(
            "docker volume inspect foo-one .Status (mounted)",
            &st_mounted,
            want,
        )?;
    }
    let ls = p.ls()?.check()?.stdout;
    expect_contains("cachedriver ls with live sessions", &ls, "foo")?;
    expect_contains("cachedriver ls with live sessions", &ls, "one")?;
    expect_contains("cachedriver ls with live sessions", &ls, "two")?;

    // foo-one stops: its work becomes layer `one`, the latest
    s.stop("w-one")?;
    p.wait_session_ended("foo", "one")?;
    expect_latest(p, "foo", "one", "after foo-one's container stopped")?;
    expect_parent(p, "foo", "one", Some("0"))?;
    let st_unmounted = s.status("foo-one")?;
    ensure!(
        st_unmounted != st_mounted,
        "docker volume inspect .Status does not change when foo-one is unmounted: {st_unmounted}"
    );

    // a new session sees one's work (and not two's, still running)
    s.start("w-three", &foo_vol("three"), "/cache", &[])?;
    let l3 = s.exec_ok("w-three", "ls -a /cache; cat /cache/one.txt")?;
    expect_contains("foo-three's view after foo-one stopped", &l3, "one.txt")?;
    expect_contains("foo-three reading one.txt", &l3, "one\n")?;
    expect_lacks("foo-three's view while foo-two still runs", &l3, "two.txt")?;
    let st3 = s.status("foo-three")?;
    expect_status_value(
        "docker volume inspect foo-three .Status (base layer)",
        &st3,
        "one",
    )?;
    s.stop("w-three")?;
    p.wait_session_ended("foo", "three")?;
    expect_latest(
        p,
        "foo",
        "one",
        "after foo-three (which wrote nothing) stopped",
    )?;

    // replace: foo-two stops last and wins wholesale
    s.stop("w-two")?;
    p.wait_session_ended("foo", "two")?;
    expect_latest(
        p,
        "foo",
        "two",
        "after foo-two's container stopped (replace mode)",
    )?;
    expect_parent(p, "foo", "two", Some("0"))?;
    let l4 = s
        .sh(
            Some((&foo_vol("four"), "/cache", false)),
            &[],
            "ls -a /cache",
        )?
        .check()?
        .stdout;
    expect_contains("foo-four's view (replace)", &l4, "two.txt")?;
    expect_lacks(
        "foo-four's view (replace: one's work is replaced)",
        &l4,
        "one.txt",
    )?;
    let ls = p.ls()?.check()?.stdout;
    expect_contains("cachedriver ls after commits", &ls, "two")?;

    // merge: concurrent writers both survive; per path the last to stop wins
    h.docker_ok(&[
        "volume",
        "create",
        "--driver",
        &name,
        "-o",
        "commit=merge",
        "bar-one",
    ])?;
    s.track(&s.vol("bar-one"));
    s.start("m-one", &s.vol("bar-one"), "/cache", &[])?;
    s.track(&s.vol("bar-two"));
    s.start_with_mounts(
        "m-two",
        &[
            "--mount".to_string(),
            format!(
                "type=volume,src=bar-two,dst=/cache,volume-driver={name},volume-opt=commit=merge"
            ),
        ],
        &[],
    )?;
    s.exec_ok(
        "m-one",
        "echo one > /cache/one.txt; echo from-one > /cache/shared.txt",
    )?;
    s.exec_ok(
        "m-two",
        "echo two > /cache/two.txt; echo from-two > /cache/shared.txt",
    )?;
    for v in ["bar-one", "bar-two"] {
        let st = s.status(v)?;
        expect_status_value(&format!("docker volume inspect {v} .Status"), &st, "merge")?;
    }
    s.stop("m-two")?;
    p.wait_session_ended("bar", "two")?;
    expect_latest(p, "bar", "two", "after bar-two stopped")?;
    s.stop("m-one")?;
    p.wait_session_ended("bar", "one")?;
    expect_latest(p, "bar", "one", "after bar-one stopped last")?;
    expect_parent(p, "bar", "one", Some("two"))?;
    let l5 = s
        .sh(
            Some((&s.vol("bar-three"), "/cache", false)),
            &[],
            "cat /cache/one.txt /cache/two.txt /cache/shared.txt",
        )?
        .check()?
        .stdout;
    ensure!(
        l5 == "one\ntwo\nfrom-one\n",
        "merge mode: a new session should see both writers' files and the last stopper's \
         shared.txt (one, two, from-one); got {l5:?}"
    );

    // discard: nothing is written back
    h.docker_ok(&[
        "volume",
        "create",
        "--driver",
        &name,
        "-o",
        "commit=discard",
        "foo-dis",
    ])?;
    s.track(&s.vol("foo-dis"));
    let before = p.latest("foo")?;
    s.sh(
        Some((&s.vol("foo-dis"), "/cache", false)),
        &[],
        "echo x > /cache/dis.txt && rm /cache/two.txt",
    )?
    .check()?;
    p.wait_session_ended("foo", "dis")?;
    expect_latest(p, "foo", &before, "after a commit=discard session")?;
    let st = s.status("foo-dis")?;
    expect_status_value("docker volume inspect foo-dis .Status", &st, "discard")?;
    let l6 = s
        .sh(
            Some((&foo_vol("five"), "/cache", false)),
            &[],
            "ls -a /cache",
        )?
        .check()?
        .stdout;
    expect_lacks("view after a discarded session", &l6, "dis.txt")?;
    expect_contains("view after a discarded session", &l6, "two.txt")?;

    // -o cache= overrides the split; the id is then the whole volume name
    h.docker_ok(&[
        "volume",
        "create",
        "--driver",
        &name,
        "-o",
        "cache=qux",
        "my-vol",
    ])?;
    s.track(&s.vol("my-vol"));
    s.sh(
        Some((&s.vol("my-vol"), "/cache", false)),
        &[],
        "echo q > /cache/q.txt",
    )?
    .check()?;
    p.wait_session_ended("qux", "my-vol")?;
    expect_latest(
        p,
        "qux",
        "my-vol",
        "after a session of volume my-vol with -o cache=qux",
    )?;
    let q = s
        .sh(
            Some((&s.vol("qux-next"), "/cache", false)),
            &[],
            "cat /cache/q.txt",
        )?
        .check()?
        .stdout;
    ensure!(
        q == "q\n",
        "qux-next should read q.txt written via my-vol; got {q:?}"
    );

    invalid_names(s)?;
    Ok(())
}

/// Invalid names and options: refused with a message that says what is valid; nothing created.
fn invalid_names(s: &Scope) -> Result<()> {
    let p = s.plugin();
    let name = p.name.as_str();
    let r = s.sh(Some((&s.vol("foo..x-1"), "/cache", false)), &[], "true")?;
    ensure!(
        !r.success(),
        "docker run with volume foo..x-1 succeeded: {}",
        r.describe()
    );
    expect_contains("docker run -v foo..x-1 error", &r.stderr, "A-Za-z0-9")?;

    let long = format!("{}-{}", "c".repeat(64), "i".repeat(64));
    for bad in ["nodash", "a/b-c", "..-x", "foo-", long.as_str()] {
        let r = s.h.docker(&["volume", "create", "--driver", name, bad])?;
        ensure!(
            !r.success(),
            "docker volume create {bad:?} succeeded: {}",
            r.describe()
        );
        expect_contains(
            &format!("docker volume create {bad:?} error"),
            &r.stderr,
            "A-Za-z0-9",
        )?;
    }
    let r = s.h.docker(&[
        "volume", "create", "--driver", name, "-o", "bogus=1", "foo-opt",
    ])?;
    ensure!(!r.success(), "unknown option accepted: {}", r.describe());
    for want in ["bogus", "commit", "cache"] {
        expect_contains(
            "unknown-option error (should list the known ones)",
            &r.stderr,
            want,
        )?;
    }
    let r = s.h.docker(&[
        "volume",
        "create",
        "--driver",
        name,
        "-o",
        "commit=sometimes",
        "foo-cv",
    ])?;
    ensure!(!r.success(), "commit=sometimes accepted: {}", r.describe());
    expect_contains("bad commit mode error", &r.stderr, "replace")?;

    let ls =
        s.h.docker_ok(&["volume", "ls", "-q", "--filter", &format!("driver={name}")])?;
    for refused in ["foo..x-1", "nodash", "foo-opt", "foo-cv"] {
        ensure!(
            !ls.lines().any(|l| l == refused),
            "refused volume {refused} is listed by docker volume ls:\n{ls}"
        );
    }
    let lower = p.root.join("lower");
    for junk in ["foo..x", "nodash", "a"] {
        ensure!(
            !lower.join(junk).exists(),
            "a refused name created {}",
            lower.join(junk).display()
        );
    }
    Ok(())
}
