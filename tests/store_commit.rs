//! Store and commit behaviour through the driver's public API, on real mounts.
//!
//! Each test runs against every backend that works here (kernel overlayfs; the FUSE backend
//! through our own binary). Without root or without a backend the tests say so loudly, and under
//! `CI=true` or `CACHEDRIVER_REQUIRE_ALL=1` that is a failure, not a skip.

#[path = "support/driver_fixture.rs"]
mod driver_fixture;

use driver_fixture::{durable_state, exe, Fixture, Holder};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use cachedriver::backend::BackendKind;
use cachedriver::names::CommitMode;
use cachedriver::protocol::{self, Endpoint};

/// Backends usable here; loud (or fatal under CI) about the ones that are not.
fn backends() -> Vec<BackendKind> {
    driver_fixture::backends("store_commit")
}

fn each(mode: CommitMode, f: impl Fn(&Fixture)) {
    for kind in backends() {
        eprintln!("-- backend {}", kind.as_str());
        let fx = Fixture::new(kind, mode);
        f(&fx);
    }
}

#[test]
fn walkthrough_replace_last_to_stop_wins() {
    each(CommitMode::Replace, |fx| {
        fx.create("foo-one", &[]);
        fx.create("foo-two", &[]);
        let one = fx.mount("foo-one", "c1");
        let two = fx.mount("foo-two", "c2");
        fs::write(one.join("one.txt"), "one").unwrap();
        fs::write(two.join("two.txt"), "two").unwrap();
        assert!(!two.join("one.txt").exists(), "sessions are isolated");
        assert!(!one.join("two.txt").exists(), "sessions are isolated");
        fx.unmount("foo-one", "c1");
        assert_eq!(fx.latest("foo"), "one");
        fx.create("foo-three", &[]);
        let three = fx.mount("foo-three", "c3");
        assert_eq!(fs::read_to_string(three.join("one.txt")).unwrap(), "one");
        assert!(!three.join("two.txt").exists());
        fx.unmount("foo-two", "c2");
        assert_eq!(fx.latest("foo"), "two");
        fx.unmount("foo-three", "c3"); // changed nothing: latest stays
        assert_eq!(fx.latest("foo"), "two");
        fx.create("foo-four", &[]);
        let four = fx.mount("foo-four", "c4");
        assert!(four.join("two.txt").exists());
        assert!(
            !four.join("one.txt").exists(),
            "replace: the last to stop wins wholesale"
        );
        fx.unmount("foo-four", "c4");
    });
}

#[test]
fn merge_keeps_concurrent_writers() {
    each(CommitMode::Replace, |fx| {
        fx.create("m-a", &[("commit", "merge")]);
        fx.create("m-b", &[("commit", "merge")]);
        let a = fx.mount("m-a", "1");
        let b = fx.mount("m-b", "2");
        fs::write(a.join("a.txt"), "a").unwrap();
        fs::write(a.join("same.txt"), "from a").unwrap();
        fs::write(b.join("b.txt"), "b").unwrap();
        fs::write(b.join("same.txt"), "from b").unwrap();
        fx.unmount("m-a", "1");
        fx.unmount("m-b", "2");
        fx.create("m-c", &[]);
        let c = fx.mount("m-c", "3");
        assert!(c.join("a.txt").exists() && c.join("b.txt").exists());
        assert_eq!(
            fs::read_to_string(c.join("same.txt")).unwrap(),
            "from b",
            "last to stop wins per path"
        );
        fx.unmount("m-c", "3");
    });
}

#[test]
fn discard_writes_nothing_back() {
    each(CommitMode::Discard, |fx| {
        fx.create("d-x", &[]);
        let x = fx.mount("d-x", "1");
        fs::write(x.join("junk"), "x").unwrap();
        fx.unmount("d-x", "1");
        assert_eq!(fx.latest("d"), "0");
        assert!(!fx.root().join("upper/d/x").exists());
        assert!(!fx.root().join("lower/d/x").exists());
    });
}

#[test]
fn docker_cp_mount_sequence_is_counted() {
    each(CommitMode::Replace, |fx| {
        fx.create("cp-run", &[]);
        let m = fx.mount("cp-run", "X");
        fs::write(m.join("before"), "1").unwrap();
        // What Docker sends for one `docker cp` into a running container.
        fx.mount("cp-run", "X");
        fx.unmount("cp-run", "X");
        fx.mount("cp-run", "X");
        fs::write(m.join("copied"), "2").unwrap();
        fx.unmount("cp-run", "X");
        assert_eq!(fx.latest("cp"), "0", "still running: nothing committed");
        assert_eq!(
            fs::read_to_string(m.join("before")).unwrap(),
            "1",
            "view still mounted"
        );
        // A second container shares the view.
        let m2 = fx.mount("cp-run", "Y");
        assert_eq!(m, m2);
        fx.unmount("cp-run", "X"); // container X stops
        assert_eq!(fx.latest("cp"), "0", "Y still holds the session");
        assert!(
            fx.driver.unmount("cp-run", "X").is_err(),
            "X has no mounts left"
        );
        fx.unmount("cp-run", "Y");
        assert_eq!(fx.latest("cp"), "run");
        let layer = fx.root().join("lower/cp/run");
        assert!(layer.join("before").exists() && layer.join("copied").exists());
    });
}

#[test]
fn registry_and_sessions_survive_a_restart() {
    for kind in backends() {
        let mut fx = Fixture::new(kind, CommitMode::Replace);
        fx.create("r-one", &[("commit", "merge")]);
        fx.create("r-idle", &[]);
        let m = fx.mount("r-one", "A");
        fs::write(m.join("f"), "x").unwrap();
        // The container keeps running across the plugin restart.
        let container = Holder::new(&m);
        let before = fx.driver.get("r-one").unwrap();
        fx.restart();
        let after = fx.driver.get("r-one").unwrap();
        assert_eq!(before.mountpoint, after.mountpoint);
        assert_eq!(before.status, after.status);
        assert_eq!(fx.driver.list().unwrap().len(), 2);
        assert_eq!(fx.driver.path("r-one").unwrap(), Some(m.clone()));
        assert_eq!(
            fs::read_to_string(m.join("f")).unwrap(),
            "x",
            "view survived"
        );
        drop(container);
        fx.unmount("r-one", "A");
        assert_eq!(fx.latest("r"), "one");
    }
}

#[test]
fn empty_session_commits_nothing_but_root_attrs_do() {
    each(CommitMode::Replace, |fx| {
        fx.create("e-a", &[]);
        fx.mount("e-a", "1");
        fx.unmount("e-a", "1");
        assert_eq!(fx.latest("e"), "0");
        // A non-root build chowns its cache root: that change must persist, and the next
        // session's root must show it (the merged root shows the upper root).
        let m = fx.mount("e-a", "2");
        // `unshare -Urm` maps only uid 0; elsewhere use a real non-root owner.
        let owner = if cachedriver::fsutil::in_user_namespace() {
            0
        } else {
            1000
        };
        std::os::unix::fs::chown(&m, Some(owner), Some(owner)).unwrap();
        fs::set_permissions(&m, fs::Permissions::from_mode(0o750)).unwrap();
        fx.unmount("e-a", "2");
        assert_eq!(fx.latest("e"), "a");
        let m = fx.mount("e-a", "3");
        let md = fs::metadata(&m).unwrap();
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (owner, owner, 0o750)
        );
        fx.unmount("e-a", "3");
    });
}

#[test]
fn taken_layer_names_get_a_suffix() {
    each(CommitMode::Replace, |fx| {
        for round in 0..3 {
            fx.create("t-same", &[]);
            let m = fx.mount("t-same", "1");
            fs::write(m.join(format!("r{round}")), "x").unwrap();
            fx.unmount("t-same", "1");
            fx.driver.remove("t-same").unwrap();
        }
        assert_eq!(fx.latest("t"), "same.2");
        let s: serde_json::Value =
            serde_json::from_slice(&fs::read(fx.root().join("lower/t/cache-state.json")).unwrap())
                .unwrap();
        assert_eq!(s["layers"]["same.2"]["parent"], "same.1");
        assert_eq!(s["layers"]["same.1"]["parent"], "same");
        assert_eq!(s["format"], 2);
    });
}

#[test]
fn seed_cache_reads_as_one_layer() {
    each(CommitMode::Replace, |fx| {
        let cache = fx.root().join("lower/seed");
        fs::create_dir_all(cache.join("three/sub")).unwrap();
        fs::write(cache.join("three/sub/artifact.jar"), "jar").unwrap();
        fs::create_dir_all(cache.join("0")).unwrap();
        fs::write(
            cache.join("cache-state.json"),
            r#"{"state":{"latest":"three"}}"#,
        )
        .unwrap();
        fx.create("seed-four", &[]);
        let m = fx.mount("seed-four", "1");
        assert_eq!(
            fs::read_to_string(m.join("sub/artifact.jar")).unwrap(),
            "jar"
        );
        fs::write(m.join("new"), "n").unwrap();
        fx.unmount("seed-four", "1");
        let s: serde_json::Value =
            serde_json::from_slice(&fs::read(cache.join("cache-state.json")).unwrap()).unwrap();
        assert_eq!(s["state"]["latest"], "four");
        assert_eq!(s["layers"]["four"]["parent"], "three");
    });
}

#[test]
fn long_chains_mount_beyond_one_page_of_options() {
    for kind in backends() {
        if kind != BackendKind::Kernel {
            continue; // one page of FUSE options is still a long command line; the kernel path is what matters
        }
        let fx = Fixture::new(kind, CommitMode::Replace);
        for i in 0..80 {
            let name = format!("long-s{i:03}");
            fx.create(&name, &[]);
            let m = fx.mount(&name, "1");
            fs::write(m.join(format!("f{i}")), "x").unwrap();
            fx.unmount(&name, "1");
        }
        fx.create("long-last", &[]);
        let m = fx.mount("long-last", "1");
        let n = fs::read_dir(&m).unwrap().count();
        assert_eq!(n, 80, "every layer of an 81-layer chain is visible");
        fx.unmount("long-last", "1");
    }
}

#[test]
fn symlinks_in_an_upper_are_committed_not_followed() {
    each(CommitMode::Replace, |fx| {
        fx.create("sym-a", &[]);
        let m = fx.mount("sym-a", "1");
        std::os::unix::fs::symlink("/etc", m.join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", m.join("passwd")).unwrap();
        fx.unmount("sym-a", "1");
        let layer = fx.root().join("lower/sym/a");
        assert!(fs::symlink_metadata(layer.join("escape"))
            .unwrap()
            .file_type()
            .is_symlink());
        let (_, entries) = cachedriver::fsutil::tree_usage(&layer);
        assert_eq!(entries, 2, "the walk did not follow the symlink into /etc");
        let listing = cachedriver::ls::render(fx.driver.store()).unwrap();
        assert!(listing.contains("cache sym: latest a"), "{listing}");
    });
}

#[test]
fn bad_requests_get_an_err_and_change_nothing() {
    each(CommitMode::Replace, |fx| {
        fx.create("bad-ok", &[]);
        let view = fx.mount("bad-ok", "held");
        // A running container of the volume (a volume nobody uses would be removable).
        let _container = Holder::new(&view);
        let before = durable_state(fx.root());
        let cases: &[(Endpoint, &str, u16, &str)] = &[
            (Endpoint::Create, "{", 400, "bad request"),
            (Endpoint::Create, "", 400, "needs a JSON body"),
            (Endpoint::Create, r#"{"Name":5}"#, 400, "invalid type"),
            (
                Endpoint::Create,
                r#"{"Name":"x-y","Opts":{"commit":3}}"#,
                400,
                "invalid type",
            ),
            (
                Endpoint::Create,
                r#"{"Name":"../../etc-x"}"#,
                400,
                "m2-job41",
            ),
            (
                Endpoint::Create,
                r#"{"Name":"noseparator"}"#,
                400,
                "m2-job41",
            ),
            (
                Endpoint::Create,
                r#"{"Name":"a-b","Opts":{"cache":"../x"}}"#,
                400,
                "m2-job41",
            ),
            (
                Endpoint::Create,
                r#"{"Name":"a-b","Opts":{"bogus":"1"}}"#,
                400,
                "cache, commit",
            ),
            (
                Endpoint::Create,
                r#"{"Name":"a-b","Opts":{"commit":"sometimes"}}"#,
                400,
                "commit=merge",
            ),
            (
                Endpoint::Create,
                r#"{"Name":"bad-ok","Opts":{"commit":"merge"}}"#,
                409,
                "already exists",
            ),
            (
                Endpoint::Create,
                r#"{"Name":"other","Opts":{"cache":"bad"}}"#,
                200,
                "",
            ),
            (
                Endpoint::Mount,
                r#"{"Name":"nope-x","ID":"1"}"#,
                404,
                "no such volume",
            ),
            (
                Endpoint::Mount,
                r#"{"Name":"a/b-c","ID":"1"}"#,
                400,
                "m2-job41",
            ),
            (
                Endpoint::Path,
                r#"{"Name":"nope-x"}"#,
                404,
                "no such volume",
            ),
            (Endpoint::Get, r#"{"Name":"nope-x"}"#, 404, "no such volume"),
            (
                Endpoint::Unmount,
                r#"{"Name":"bad-ok","ID":"stranger"}"#,
                409,
                "not mounted by ID",
            ),
            (Endpoint::Remove, r#"{"Name":"bad-ok"}"#, 409, "in use"),
        ];
        for (ep, body, status, needle) in cases {
            let r = protocol::handle(&fx.driver, *ep, body.as_bytes());
            assert_eq!(r.status, *status, "{ep:?} {body}: {:?}", r.body);
            if *status != 200 {
                let err = r.body["Err"].as_str().unwrap_or_default();
                assert!(err.contains(needle), "{ep:?} {body}: {err}");
            } else {
                // The one valid request in the list: undo it so the comparison below holds.
                fx.driver.remove("other").unwrap();
            }
        }
        assert_eq!(
            before,
            durable_state(fx.root()),
            "bad requests changed nothing"
        );
        let r = protocol::handle(&fx.driver, Endpoint::List, b"");
        assert_eq!(r.status, 200, "Podman's empty List body is fine");
        let r = protocol::handle(&fx.driver, Endpoint::Activate, b"");
        assert_eq!(r.body["Implements"][0], "VolumeDriver");
        fx.unmount("bad-ok", "held");
    });
}

#[test]
fn concurrent_sessions_across_and_within_caches() {
    each(CommitMode::Merge, |fx| {
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    let cache = if t % 2 == 0 { "ca" } else { "cb" };
                    for i in 0..10 {
                        let name = format!("{cache}-t{t}i{i}");
                        fx.create(&name, &[]);
                        let m = fx.mount(&name, "id");
                        fs::write(m.join(format!("t{t}i{i}")), "x").unwrap();
                        fx.unmount(&name, "id");
                    }
                });
            }
        });
        for cache in ["ca", "cb"] {
            let name = format!("{cache}-check");
            fx.create(&name, &[]);
            let m = fx.mount(&name, "id");
            assert_eq!(
                fs::read_dir(&m).unwrap().count(),
                20,
                "merge kept every writer of {cache}"
            );
            fx.unmount(&name, "id");
        }
    });
}

/// Set in the inner run of [`rootless_inside_a_user_namespace`].
const INNER: &str = "CACHEDRIVER_TEST_IN_USERNS";

#[test]
fn rootless_inside_a_user_namespace() {
    if std::env::var_os(INNER).is_some() {
        return; // the inner run executes the selected tests themselves
    }
    if backends().is_empty() {
        return;
    }
    let self_exe = std::env::current_exe().expect("test binary");
    for test in [
        "walkthrough_replace_last_to_stop_wins",
        "merge_keeps_concurrent_writers",
        "docker_cp_mount_sequence_is_counted",
        "empty_session_commits_nothing_but_root_attrs_do",
        "user_namespace_stores_use_user_xattrs",
    ] {
        let out = std::process::Command::new("unshare")
            .args(["-Urm", "--propagation", "private", "--"])
            .arg(&self_exe)
            .args(["--exact", test, "--test-threads=1", "--nocapture"])
            .env(INNER, "1")
            .output()
            .expect("running unshare");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{test} inside `unshare -Urm` failed:\n{text}"
        );
        assert!(
            text.contains("1 passed"),
            "{test} did not run inside the namespace:\n{text}"
        );
        for b in ["kernel", "fuse"] {
            assert!(
                text.contains(&format!("-- backend {b}")),
                "{test}: {b} backend did not run rootless:\n{text}"
            );
        }
    }
}

#[test]
fn user_namespace_stores_use_user_xattrs() {
    if std::env::var_os(INNER).is_none() {
        // Runs only inside the namespace, where the store must pick user.overlay.* markers.
        return;
    }
    each(CommitMode::Replace, |fx| {
        fx.create("ns-a", &[]);
        let m = fx.mount("ns-a", "1");
        fs::write(m.join("f"), "x").unwrap();
        fx.unmount("ns-a", "1");
        let s: serde_json::Value =
            serde_json::from_slice(&fs::read(fx.root().join("lower/ns/cache-state.json")).unwrap())
                .unwrap();
        assert_eq!(s["xattr"], "user");
    });
}

#[test]
fn a_dead_fuse_server_harms_no_other_session_and_is_remounted() {
    for kind in backends() {
        if kind != BackendKind::Fuse {
            continue;
        }
        let fx = Fixture::new(kind, CommitMode::Replace);
        fx.create("crash-a", &[]);
        fx.create("crash-b", &[]);
        let a = fx.mount("crash-a", "1");
        let b = fx.mount("crash-b", "1");
        fs::write(a.join("kept"), "a").unwrap();
        fs::write(b.join("other"), "b").unwrap();
        let pid_file = fx.root().join("work/crash/.a.pid");
        let pid: i32 = fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("pid file {}: {e}", pid_file.display()))
            .trim()
            .parse()
            .unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while fs::metadata(&a).is_ok() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            fs::metadata(&a).is_err(),
            "the killed server's mount is dead"
        );
        assert_eq!(
            fs::read_to_string(b.join("other")).unwrap(),
            "b",
            "the other session is untouched"
        );
        // A further Mount of the volume finds the dead view and mounts it again over the upper.
        let again = fx.mount("crash-a", "2");
        assert_eq!(
            fs::read_to_string(again.join("kept")).unwrap(),
            "a",
            "the session's writes survived"
        );
        fx.unmount("crash-a", "1");
        fx.unmount("crash-a", "2");
        assert_eq!(fx.latest("crash"), "a");
        fx.unmount("crash-b", "1");
        assert_eq!(fx.latest("crash"), "b");
    }
}

#[test]
fn probe_reports_both_backends_here_and_in_a_user_namespace() {
    if backends().is_empty() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(exe())
        .args(["probe", "--json", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "probe --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(v["kernel"], "ok", "{v}");
    assert_eq!(v["fuse"], "ok", "{v}");
    assert_eq!(v["auto"], "kernel", "{v}");
    assert!(
        v["kernel_path"]
            .as_str()
            .is_some_and(|p| p.contains("lowerdir+")),
        "probe names the kernel mount path (this kernel has lowerdir+): {v}"
    );
    // Forced classic (as on kernels before 6.8): probe says so.
    let out = std::process::Command::new(exe())
        .args(["probe", "--json", "--root"])
        .arg(root.path())
        .env("CACHEDRIVER_KERNEL_MOUNT", "classic")
        .output()
        .unwrap();
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        c["kernel"] == "ok"
            && c["kernel_path"]
                .as_str()
                .is_some_and(|p| p.contains("classic")),
        "probe with CACHEDRIVER_KERNEL_MOUNT=classic: {c}"
    );
    let inner = &v["rootless"];
    assert_eq!(inner["userns"], true, "{v}");
    assert_eq!(inner["xattr"], "user", "{v}");
    assert_eq!(
        inner["kernel"], "ok",
        "kernel overlay with userxattr inside a user namespace: {v}"
    );
    assert_eq!(inner["fuse"], "ok", "FUSE inside a user namespace: {v}");
    let text = std::process::Command::new(exe())
        .args(["probe", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("auto picks: kernel") && text.contains("inside a new user namespace"),
        "{text}"
    );
    assert_eq!(
        fs::read_dir(root.path()).unwrap().count(),
        0,
        "probe dirs are removed"
    );
}
