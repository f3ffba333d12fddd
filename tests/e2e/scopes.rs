//! Scopes against a real dockerd (issue 14): a pull request's scope forked from `main` sees
//! main's files, its commits never reach `main`, its second job sees its first job's commit;
//! `from=a:b` falls back in order; `cachedriver ls` shows the scopes and `rm CACHE:SCOPE`
//! drops one; bad scope options are refused at Create.

use super::harness::{expect_contains, expect_lacks, Harness, Scope};
use super::plugin::Backend;
use anyhow::{ensure, Result};

/// Runs the scenario on `backend`.
pub fn scopes(h: &Harness, backend: Backend) -> Result<()> {
    let s = Scope::with_plugin(h, &format!("scopes-{}", backend.as_str()), backend, None)?;
    let name = s.plugin().name.clone();
    let create = |v: &str, opts: &[&str]| -> Result<()> {
        let mut args = vec!["volume", "create", "--driver", name.as_str()];
        for o in opts {
            args.extend(["-o", o]);
        }
        args.push(v);
        h.docker_ok(&args)?;
        Ok(())
    };
    let run = |v: &str, script: &str| -> Result<String> {
        let out = s
            .sh(Some((&s.vol(v), "/cache", false)), &[], script)?
            .check()?;
        Ok(out.stdout)
    };

    // main's jobs
    create("sc-main1", &["scope=main"])?;
    run("sc-main1", "echo main > /cache/main.txt")?;
    s.plugin().wait_session_ended("sc", "main1")?;

    // a PR forks main: sees main's files, writes its own
    create("sc-pr1", &["scope=pr-1", "from=main"])?;
    let v = run("sc-pr1", "ls /cache; echo pr > /cache/pr.txt")?;
    expect_contains("the PR's first job (forked from main)", &v, "main.txt")?;
    s.plugin().wait_session_ended("sc", "pr1")?;

    // main never sees the PR's commit
    create("sc-main2", &["scope=main"])?;
    let v = run("sc-main2", "ls /cache")?;
    expect_contains("main's next job", &v, "main.txt")?;
    expect_lacks("main's next job after a PR job committed", &v, "pr.txt")?;

    // the PR's second job sees its first job's commit
    create("sc-pr2", &["scope=pr-1", "from=main"])?;
    let v = run("sc-pr2", "ls /cache")?;
    expect_contains("the PR's second job", &v, "pr.txt")?;
    expect_contains("the PR's second job", &v, "main.txt")?;

    // from=a:b falls back in order: `nope` has nothing, `rel` has something, `main` too
    create("sc-rel1", &["scope=rel"])?;
    run("sc-rel1", "echo rel > /cache/rel.txt")?;
    s.plugin().wait_session_ended("sc", "rel1")?;
    create("sc-fb", &["scope=pr-2", "from=nope:rel:main"])?;
    let v = run("sc-fb", "ls /cache")?;
    expect_contains("from=nope:rel:main", &v, "rel.txt")?;
    expect_lacks("from=nope:rel:main (rel comes before main)", &v, "main.txt")?;
    // and a scope with no fallback starts empty
    create("sc-new", &["scope=fresh"])?;
    let v = run("sc-new", "ls -A /cache | wc -l")?;
    ensure!(
        v.trim() == "0",
        "a new scope without from= is not empty: {v}"
    );

    // the default scope (state.latest) was never touched
    let st = s.plugin().cache_state("sc")?;
    ensure!(
        st.pointer("/state/latest").and_then(|v| v.as_str()) == Some("0"),
        "scoped commits moved the default scope's state.latest: {st}"
    );
    ensure!(
        st.pointer("/scopes/pr-1/forked_from")
            .and_then(|v| v.as_str())
            == Some("main"),
        "scope pr-1 does not record that it forked main: {st}"
    );

    let ls = s.plugin().ls()?.check()?.stdout;
    expect_contains("cachedriver ls", &ls, "scope pr-1")?;
    expect_contains("cachedriver ls", &ls, "forked from main")?;
    let rm = super::util::run(
        std::process::Command::new(super::plugin::binary())
            .args(["rm", "--root"])
            .arg(&s.plugin().root)
            .arg("sc:pr-1"),
        std::time::Duration::from_secs(30),
    )?
    .check()?;
    expect_contains("cachedriver rm sc:pr-1", &rm.stdout, "removed scope pr-1")?;
    let st = s.plugin().cache_state("sc")?;
    ensure!(
        st.pointer("/scopes/pr-1").is_none(),
        "scope pr-1 still there after rm: {st}"
    );
    ensure!(
        st.pointer("/scopes/main").is_some(),
        "rm sc:pr-1 removed main too: {st}"
    );

    // bad scope options are refused at Create, nothing recorded
    for (opts, needle) in [
        (vec!["scope=a/b"], "scope"),
        (vec!["scope=x", "from=x"], "own scope"),
        (vec!["from=a:b:c:d:e:f:g:h:i"], "at most 8"),
    ] {
        let mut args = vec!["volume", "create", "--driver", name.as_str()];
        for o in &opts {
            args.extend(["-o", o]);
        }
        args.push("sc-bad");
        let r = h.docker(&args)?;
        ensure!(!r.success(), "Create with {opts:?} was accepted");
        expect_contains(&format!("Create with {opts:?}"), &r.stderr, needle)?;
    }
    ensure!(
        !s.plugin().root.join("volumes/sc-bad.json").exists(),
        "a refused Create recorded the volume"
    );
    Ok(())
}
