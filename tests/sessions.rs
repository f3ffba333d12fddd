//! Orphaned sessions, mount-count resets, startup recovery and hung FUSE servers (issue 12
//! items 1, 2, 9), through the driver and the protocol on real mounts, on both backends.
//!
//! A "container" here is a child process: one whose cwd is in the view, or one in its own mount
//! namespace with the view bind-mounted elsewhere (what runc does). The test process itself is
//! the plugin, which never counts as a user of a view.
//!
//! Without root or a backend the tests say so loudly; under `CI=true` or
//! `CACHEDRIVER_REQUIRE_ALL=1` that is a failure.

#[path = "support/driver_fixture.rs"]
mod driver_fixture;

use driver_fixture::{exe, Holder};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachedriver::backend::BackendKind;
use cachedriver::driver::{Config, Driver};
use cachedriver::names::CommitMode;
use cachedriver::protocol::{self, Endpoint};
use cachedriver::store::{Store, VolumeRecord};

/// Backends usable here; loud (or fatal under CI) about the ones that are not.
fn backends() -> Vec<BackendKind> {
    driver_fixture::backends("sessions")
}

/// A driver over a temp root with no orphan grace (tests decide who uses a view); unmounts
/// everything left under the root on drop.
struct Fixture {
    dir: tempfile::TempDir,
    driver: Arc<Driver>,
    kind: BackendKind,
    mode: CommitMode,
}

impl Fixture {
    fn new(kind: BackendKind, mode: CommitMode) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let driver = Arc::new(Self::driver_at(dir.path(), kind, mode));
        Fixture {
            dir,
            driver,
            kind,
            mode,
        }
    }

    fn driver_at(root: &Path, kind: BackendKind, mode: CommitMode) -> Driver {
        Self::driver_with_grace(root, kind, mode, Duration::ZERO)
    }

    /// A driver after startup recovery, as `serve` makes it: the grace is set before recovery.
    fn driver_with_grace(
        root: &Path,
        kind: BackendKind,
        mode: CommitMode,
        grace: Duration,
    ) -> Driver {
        let d = Driver::open(
            Store::open(root).expect("store"),
            Config {
                backend: kind,
                commit: mode,
                exe: exe(),
            },
        )
        .with_orphan_grace(grace);
        d.recover().expect("startup recovery");
        d
    }

    /// A new plugin process on the same root: startup recovery runs.
    fn restart(&mut self) {
        self.driver = Arc::new(Self::driver_at(self.dir.path(), self.kind, self.mode));
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn create(&self, name: &str, opts: &[(&str, &str)]) {
        let o: BTreeMap<String, String> = opts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.driver.create(name, &o).expect("create");
    }

    fn mount(&self, name: &str, id: &str) -> PathBuf {
        self.driver
            .mount(name, id)
            .unwrap_or_else(|e| panic!("mount {name} {id}: {e}"))
    }

    fn unmount(&self, name: &str, id: &str) {
        self.driver
            .unmount(name, id)
            .unwrap_or_else(|e| panic!("unmount {name} {id}: {e}"))
    }

    fn latest(&self, cache: &str) -> String {
        let s: serde_json::Value = serde_json::from_slice(
            &fs::read(
                self.root()
                    .join("lower")
                    .join(cache)
                    .join("cache-state.json"),
            )
            .expect("state"),
        )
        .expect("json");
        s["state"]["latest"].as_str().expect("latest").to_string()
    }

    fn record(&self, name: &str) -> VolumeRecord {
        self.driver
            .store()
            .load_volume(name)
            .expect("load")
            .expect("record")
    }

    fn is_mounted(&self, p: &Path) -> bool {
        cachedriver::fsutil::mount_fstype(p).is_some()
    }

    fn save(&self, rec: &VolumeRecord) {
        self.driver.store().save_volume(rec).expect("save record");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Resume any server a test stopped, then unmount everything under the root.
        for p in fs::read_dir(self.dir.path().join("work"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in fs::read_dir(p.path()).into_iter().flatten().flatten() {
                if let Some(pid) = fs::read_to_string(f.path())
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGCONT,
                    );
                }
            }
        }
        driver_fixture::unmount_below(self.dir.path());
    }
}

/// A stand-in for a container as runc makes one: a process in its own mount namespace with
/// the view bind-mounted at another place, cwd `/`.
struct NsContainer {
    child: Child,
    _dest: tempfile::TempDir,
    _marks: tempfile::TempDir,
}

impl NsContainer {
    fn new(view: &Path) -> Self {
        let dest = tempfile::tempdir().expect("tempdir");
        let marks = tempfile::tempdir().expect("tempdir");
        let ready = marks.path().join("ready");
        let script = format!(
            "mount --bind '{}' '{}' && touch '{}' && exec sleep 600",
            view.display(),
            dest.path().display(),
            ready.display()
        );
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .current_dir("/")
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(
                Instant::now() < deadline,
                "the namespace never bind-mounted the view"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        NsContainer {
            child,
            _dest: dest,
            _marks: marks,
        }
    }
}

impl Drop for NsContainer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn each(mode: CommitMode, f: impl Fn(&mut Fixture)) {
    for kind in backends() {
        eprintln!("-- backend {} mode {}", kind.as_str(), mode.as_str());
        let mut fx = Fixture::new(kind, mode);
        f(&mut fx);
    }
}

/// Runs `f` on a thread; fails the test (instead of hanging it) if it takes longer than `limit`.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {limit:?} (blocked by a hung FUSE server?)"),
    }
}

#[test]
fn engine_restart_resets_a_counted_id() {
    each(CommitMode::Replace, |fx| {
        // After a new Plugin.Activate, a Mount of an ID still counted from before resets it,
        // even while the view is in use (the orphan grace keeps the unused-view rule out).
        let d = Arc::new(Fixture::driver_with_grace(
            fx.root(),
            fx.kind,
            fx.mode,
            Duration::from_secs(600),
        ));
        fx.driver = d.clone();
        fx.create("rs-x", &[]);
        protocol::handle(&d, Endpoint::Activate, b"");
        let m = fx.mount("rs-x", "X");
        fs::write(m.join("lost"), "1").unwrap();
        protocol::handle(&d, Endpoint::Activate, b""); // dockerd killed -9 and restarted
        let m2 = fx.mount("rs-x", "X"); // `docker start` of the lost container
        assert_eq!(m, m2);
        assert_eq!(
            fx.record("rs-x").session.unwrap().mounts["X"],
            1,
            "reset, not 2"
        );
        fs::write(m.join("after"), "2").unwrap();
        fx.unmount("rs-x", "X"); // its stop commits
        assert_eq!(fx.latest("rs"), "x");
        let layer = fx.root().join("lower/rs/x");
        assert!(layer.join("lost").exists() && layer.join("after").exists());

        // Without an Activate, a counted ID whose view nobody uses is also an engine restart.
        fx.driver = Arc::new(Fixture::driver_at(fx.root(), fx.kind, fx.mode));
        fx.create("rs-y", &[]);
        fx.mount("rs-y", "Y");
        fx.mount("rs-y", "Y");
        assert_eq!(fx.record("rs-y").session.unwrap().mounts["Y"], 1);
        fx.unmount("rs-y", "Y");
        assert!(fx.record("rs-y").session.is_none(), "one Unmount ends it");

        // Docker's `docker cp` sequence into a running container is still counted.
        fx.create("rs-cp", &[]);
        let m = fx.mount("rs-cp", "X");
        let container = Holder::new(&m);
        fx.mount("rs-cp", "X");
        fx.unmount("rs-cp", "X");
        fx.mount("rs-cp", "X");
        fs::write(m.join("copied"), "c").unwrap();
        fx.unmount("rs-cp", "X");
        assert!(fx.is_mounted(&m), "the container still runs");
        assert_eq!(fx.record("rs-cp").session.unwrap().mounts["X"], 1);
        drop(container);
        fx.unmount("rs-cp", "X");
        assert!(!fx.is_mounted(&m));
        assert_eq!(fx.latest("rs"), "cp");
    });
}

fn check_committed(fx: &Fixture, cache: &str, id: &str, file: &str) {
    let layer = fx.root().join("lower").join(cache).join(id);
    match fx.mode {
        CommitMode::Discard => {
            assert!(!layer.exists(), "discard wrote a layer");
            assert_eq!(fx.latest(cache), "0");
        }
        _ => {
            assert_eq!(fx.latest(cache), id, "the orphan was committed");
            assert!(layer.join(file).exists(), "its writes are in the layer");
        }
    }
}

#[test]
fn unused_sessions_end_at_mount_remove_sweep_and_startup() {
    for mode in [CommitMode::Replace, CommitMode::Merge, CommitMode::Discard] {
        each(mode, |fx| {
            // Next Mount (a new container, new ID) ends the orphan and starts afresh.
            fx.create("om-a", &[]);
            let m = fx.mount("om-a", "lost");
            fs::write(m.join("fa"), "a").unwrap();
            let m2 = fx.mount("om-a", "new");
            check_committed(fx, "om", "a", "fa");
            assert_eq!(
                m2.join("fa").exists(),
                fx.mode != CommitMode::Discard,
                "the new session starts on the committed snapshot"
            );
            assert_eq!(
                fx.record("om-a").session.unwrap().mounts,
                BTreeMap::from([("new".to_string(), 1)])
            );
            fx.unmount("om-a", "new");

            // Remove of a volume whose container was lost and removed.
            fx.create("or-b", &[]);
            let m = fx.mount("or-b", "lost");
            fs::write(m.join("fb"), "b").unwrap();
            fx.driver.remove("or-b").expect("remove of an orphan");
            check_committed(fx, "or", "b", "fb");
            assert!(!fx.is_mounted(&m));
            assert!(fx.driver.store().load_volume("or-b").unwrap().is_none());

            // The sweep.
            fx.create("os-c", &[]);
            let m = fx.mount("os-c", "lost");
            fs::write(m.join("fc"), "c").unwrap();
            assert_eq!(fx.driver.sweep(), Some(1));
            check_committed(fx, "os", "c", "fc");
            assert!(!fx.root().join("upper/os/c").exists());
            assert!(!fx.is_mounted(&m));
            assert!(fx.record("os-c").session.is_none());

            // Startup, view still mounted; and startup after the view is gone (host reboot).
            fx.create("ou-d", &[]);
            fx.create("ou-e", &[]);
            let d = fx.mount("ou-d", "lost");
            fs::write(d.join("fd"), "d").unwrap();
            let e = fx.mount("ou-e", "lost");
            fs::write(e.join("fe"), "e").unwrap();
            let pid_e = fx.record("ou-e").session.unwrap().pid;
            nix::mount::umount2(&e, nix::mount::MntFlags::MNT_DETACH).unwrap();
            if let Some(pid) = pid_e {
                let deadline = Instant::now() + Duration::from_secs(5);
                while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            fx.restart();
            assert!(fx.record("ou-d").session.is_none());
            assert!(fx.record("ou-e").session.is_none());
            assert!(!fx.is_mounted(&d) && !fx.is_mounted(&e));
            let latest = fx.latest("ou");
            match fx.mode {
                CommitMode::Discard => assert_eq!(latest, "0"),
                CommitMode::Merge => {
                    // Both committed, one on top of the other.
                    let l = fx.root().join("lower/ou");
                    assert!(l.join("d/fd").exists() && l.join("e/fe").exists());
                }
                CommitMode::Replace => {
                    assert!(latest == "d" || latest == "e");
                }
            }
            // Everything still works after recovery.
            let v = fx.mount("ou-d", "again");
            fx.unmount("ou-d", "again");
            assert!(!fx.is_mounted(&v));
            fx.driver.remove("ou-d").unwrap();
        });
    }
}

#[test]
fn a_session_mounted_just_before_a_restart_survives_startup_within_the_grace() {
    each(CommitMode::Merge, |fx| {
        // The plugin restarts between its Mount reply and the engine's bind mount: nobody uses
        // the view yet, but the record was written moments ago.
        fx.create("og-a", &[]);
        let m = fx.mount("og-a", "c1");
        fs::write(m.join("fg"), "g").unwrap();
        let grace = Duration::from_secs(3);
        let start = Instant::now();
        fx.driver = Arc::new(Fixture::driver_with_grace(
            fx.root(),
            fx.kind,
            fx.mode,
            grace,
        ));
        assert!(
            fx.record("og-a").session.is_some(),
            "startup recovery must keep a session mounted within the orphan grace"
        );
        if start.elapsed() < grace {
            assert_eq!(
                fx.driver.sweep(),
                Some(0),
                "the sweep keeps it within the grace"
            );
        }
        std::thread::sleep(grace.saturating_sub(start.elapsed()) + Duration::from_millis(200));
        assert_eq!(
            fx.driver.sweep(),
            Some(1),
            "after the grace the sweep ends it"
        );
        check_committed(fx, "og", "a", "fg");
        assert!(!fx.is_mounted(&m));
    });
}

#[test]
fn a_view_held_in_another_namespace_is_never_ended() {
    each(CommitMode::Merge, |fx| {
        fx.create("held-a", &[]);
        let m = fx.mount("held-a", "X");
        fs::write(m.join("f"), "1").unwrap();
        let container = NsContainer::new(&m);
        let users = cachedriver::sessions::users(&m, &fx.root().join("upper/held/a"));
        assert!(users.in_use(), "the namespace is found: {users:?}");
        assert_eq!(users.namespaces.len(), 1, "{users:?}");

        assert_eq!(fx.driver.sweep(), Some(0), "the sweep keeps it");
        let e = fx.driver.remove("held-a").expect_err("remove refused");
        assert!(e.to_string().contains("in use"), "{e}");
        let j = fx.mount("held-a", "Y"); // another container joins
        assert_eq!(j, m);
        assert!(j.join("f").exists());
        fx.restart();
        assert!(fx.record("held-a").session.is_some(), "startup keeps it");
        fx.unmount("held-a", "X");
        fx.unmount("held-a", "Y");
        let rec = fx.record("held-a");
        assert!(
            rec.session.as_ref().is_some_and(|s| s.mounts.is_empty()),
            "last Unmount while still used keeps the session, durably: {rec:?}"
        );
        assert!(fx.is_mounted(&m));
        let e = fx.driver.end("held-a", false).expect_err("end refused");
        assert!(e.to_string().contains("still used by"), "{e}");
        let list = fx.driver.sessions().unwrap();
        assert_eq!(list.len(), 1);
        assert!(list[0].users.in_use());
        assert_eq!(fx.latest("held"), "0", "nothing committed while used");

        drop(container);
        assert_eq!(
            fx.driver.sweep(),
            Some(1),
            "ended once the container is gone"
        );
        assert_eq!(fx.latest("held"), "a");
        assert!(!fx.is_mounted(&m));
        fx.driver.remove("held-a").unwrap();
    });
}

/// Leaves the store as a crash in the middle of the last Unmount of `name` would: view
/// unmounted, `session.committing` naming `layer`; `renamed` moves the upper into place,
/// `named` also writes the state naming it.
fn crash_mid_commit(fx: &Fixture, name: &str, renamed: bool, named: bool) -> String {
    let mut rec = fx.record(name);
    let s = rec.session.clone().unwrap();
    let merged = fx.root().join("merged").join(&rec.cache).join(&rec.id);
    // Other tests of this binary run in parallel and fork processes (namespaces, holders) that
    // may briefly pin the view: retry EBUSY as the plugin's own unmount does.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match nix::mount::umount2(&merged, nix::mount::MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            r => break r.unwrap(),
        }
    }
    if let Some(pid) = s.pid {
        let deadline = Instant::now() + Duration::from_secs(5);
        while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let layer = rec.id.clone();
    rec.session.as_mut().unwrap().committing = Some(layer.clone());
    fx.save(&rec);
    let store = fx.driver.store();
    if renamed {
        fs::rename(
            store.upper_dir(&rec.cache, &rec.id),
            store.layer_dir(&rec.cache, &layer),
        )
        .unwrap();
    }
    if named {
        let mut st = store.load_state(&rec.cache).unwrap().unwrap();
        let parent = st.state.latest.clone();
        st.push_layer(&layer, &parent, name);
        store.save_state(&rec.cache, &st).unwrap();
    }
    layer
}

#[test]
fn a_commit_cut_short_is_finished_by_startup_recovery() {
    each(CommitMode::Replace, |fx| {
        for (i, (renamed, named)) in [(false, false), (true, false), (true, true)]
            .into_iter()
            .enumerate()
        {
            let name = format!("cc{i}-v");
            let cache = format!("cc{i}");
            fx.create(&name, &[]);
            let m = fx.mount(&name, "X");
            fs::write(m.join("f"), format!("{i}")).unwrap();
            // A stale temp file of a dead writer, as atomic_write leaves after a crash.
            let tmp = fx.root().join(format!("volumes/.{name}.json.tmp-999999"));
            fs::write(&tmp, "junk").unwrap();
            let layer = crash_mid_commit(fx, &name, renamed, named);
            fx.restart();
            assert!(!tmp.exists(), "stale temp file removed");
            let rec = fx.record(&name);
            assert!(rec.session.is_none(), "case {i}: session cleared: {rec:?}");
            assert_eq!(fx.latest(&cache), layer, "case {i}: the commit completed");
            assert_eq!(
                fs::read_to_string(fx.root().join("lower").join(&cache).join(&layer).join("f"))
                    .unwrap(),
                format!("{i}")
            );
            // Docker's next calls all work.
            for (ep, body) in [
                (Endpoint::Get, format!(r#"{{"Name":"{name}"}}"#)),
                (Endpoint::List, String::new()),
                (Endpoint::Mount, format!(r#"{{"Name":"{name}","ID":"Y"}}"#)),
                (
                    Endpoint::Unmount,
                    format!(r#"{{"Name":"{name}","ID":"Y"}}"#),
                ),
                (Endpoint::Remove, format!(r#"{{"Name":"{name}"}}"#)),
            ] {
                let r = protocol::handle(&fx.driver, ep, body.as_bytes());
                assert_eq!(r.status, 200, "case {i} {ep:?}: {:?}", r.body);
            }
        }
        // Also finished by the next request when no restart happens in between.
        fx.create("cc9-v", &[]);
        let m = fx.mount("cc9-v", "X");
        fs::write(m.join("f"), "9").unwrap();
        crash_mid_commit(fx, "cc9-v", true, false);
        let m = fx.mount("cc9-v", "Y");
        assert_eq!(fs::read_to_string(m.join("f")).unwrap(), "9");
        fx.unmount("cc9-v", "Y");
    });
}

#[test]
fn a_commit_cut_short_after_its_state_write_is_never_replayed_after_compaction() {
    each(CommitMode::Replace, |fx| {
        // Cut short after the state names layer `v` (the record still says `committing`).
        fx.create("cz-v", &[]);
        let m = fx.mount("cz-v", "X");
        fs::write(m.join("f"), "v").unwrap();
        let layer = crash_mid_commit(fx, "cz-v", true, true);
        // Later commits bury it under the compaction bound.
        fx.create("cz-w", &[]);
        for i in 0..3 {
            let m = fx.mount("cz-w", "W");
            fs::write(m.join(format!("w{i}")), "w").unwrap();
            fx.unmount("cz-w", "W");
        }
        let latest = fx.latest("cz");
        assert_ne!(latest, layer);
        // Compaction waits: flattening `v` away before recovery settles it would make recovery
        // commit it a second time (on its old base, in replace mode: losing the later commits).
        let store = fx.driver.store();
        let r = cachedriver::compact::compact_cache(store, "cz", 2, true).expect("compact");
        assert!(
            r.is_none(),
            "compaction must wait for the unsettled commit: {r:?}"
        );
        let st = store.load_state("cz").unwrap().unwrap();
        assert!(st.layers.contains_key(&layer), "state unchanged");
        // Recovery settles it without replaying it; then compaction goes ahead.
        fx.restart();
        assert!(fx.record("cz-v").session.is_none());
        assert_eq!(fx.latest("cz"), latest, "nothing replayed on top");
        let r =
            cachedriver::compact::compact_cache(fx.driver.store(), "cz", 2, true).expect("compact");
        assert!(r.is_some(), "compaction runs once the commit is settled");
        let m = fx.mount("cz-w", "W");
        for f in ["f", "w0", "w1", "w2"] {
            assert!(m.join(f).exists(), "{f} in the latest snapshot");
        }
        fx.unmount("cz-w", "W");
    });
}

#[test]
fn merge_changes_the_root_attrs_only_if_the_session_did() {
    each(CommitMode::Merge, |fx| {
        fx.create("ra-a", &[]);
        fx.create("ra-b", &[]);
        fx.create("ra-c", &[]);
        let a = fx.mount("ra-a", "1");
        let b = fx.mount("ra-b", "1"); // started on the same base as a
        std::os::unix::fs::chown(&a, Some(1000), Some(1000)).unwrap();
        fs::set_permissions(&a, fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(a.join("fa"), "a").unwrap();
        fx.unmount("ra-a", "1");
        fs::write(b.join("fb"), "b").unwrap(); // b never touches the root
        fx.unmount("ra-b", "1");
        assert_eq!(fx.latest("ra"), "b");
        let c = fx.mount("ra-c", "1");
        let md = fs::metadata(&c).unwrap();
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (1000, 1000, 0o750),
            "b's merge kept a's root attributes"
        );
        assert!(c.join("fa").exists() && c.join("fb").exists());
        // A session that does change them wins, as for any path.
        fs::set_permissions(&c, fs::Permissions::from_mode(0o700)).unwrap();
        fx.unmount("ra-c", "1");
        let md = fs::metadata(fx.root().join("lower/ra/c")).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o700);
        assert_eq!((md.uid(), md.gid()), (1000, 1000));
    });
}

#[test]
fn a_hung_fuse_server_blocks_neither_startup_nor_other_caches() {
    for kind in backends() {
        if kind != BackendKind::Fuse {
            continue;
        }
        let mut fx = Fixture::new(kind, CommitMode::Replace);
        fx.create("hung-a", &[]);
        fx.create("fine-b", &[]);
        let a = fx.mount("hung-a", "X");
        fs::write(a.join("fa"), "a").unwrap();
        let container = NsContainer::new(&a); // keeps hung-a's session alive through restarts
        let holder = Holder::new(&a); // a cwd inside the hung view: found without touching it
        let pid = fx.record("hung-a").session.unwrap().pid.expect("fuse pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();

        // Startup with a hung server: recovery keeps the used session and finishes promptly.
        let (root, k) = (fx.root().to_path_buf(), fx.kind);
        let d = within(Duration::from_secs(20), "startup", move || {
            Fixture::driver_at(&root, k, CommitMode::Replace)
        });
        fx.driver = Arc::new(d);
        // Requests for the other cache, and Get/List, are served meanwhile.
        let d = fx.driver.clone();
        within(
            Duration::from_secs(20),
            "requests for another cache",
            move || {
                let m = d.mount("fine-b", "1").unwrap();
                fs::write(m.join("fb"), "b").unwrap();
                d.unmount("fine-b", "1").unwrap();
                d.get("hung-a").unwrap();
                d.list().unwrap();
                d.sessions().unwrap();
                assert_eq!(d.sweep(), Some(0));
            },
        );
        assert_eq!(fx.latest("fine"), "b");
        // A Mount of the hung volume itself answers too (joins: a container still has it).
        let d = fx.driver.clone();
        within(
            Duration::from_secs(20),
            "mount of the hung volume",
            move || {
                d.mount("hung-a", "Y").unwrap();
            },
        );

        let users = fx.driver.sessions().unwrap();
        assert!(
            users[0].users.pids.contains(&(holder.pid() as i32)),
            "{users:?}"
        );
        // Once its container is gone, the hung session is ended (server killed) and committed.
        drop(container);
        drop(holder);
        eprintln!(
            "users after the container: {:?}",
            fx.driver.sessions().unwrap()
        );
        let d = fx.driver.clone();
        let n = within(
            Duration::from_secs(30),
            "sweep of the hung session",
            move || d.sweep(),
        );
        assert_eq!(n, Some(1));
        assert!(!fx.is_mounted(&a));
        let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z"),
            "the hung server was killed: {state}"
        );
        assert_eq!(fx.latest("hung"), "a");
        assert_eq!(
            fs::read_to_string(fx.root().join("lower/hung/a/fa")).unwrap(),
            "a"
        );
    }
}

#[test]
fn cli_lists_sessions_with_their_users_and_ends_one() {
    for kind in backends() {
        let fx = Fixture::new(kind, CommitMode::Replace);
        fx.create("cli-a", &[]);
        let m = fx.mount("cli-a", "X");
        fs::write(m.join("f"), "x").unwrap();
        let holder = Holder::new(&m);
        let out = Command::new(exe())
            .args(["sessions", "--json", "--root"])
            .arg(fx.root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v[0]["volume"], "cli-a");
        let pids: Vec<i64> = v[0]["users"]["pids"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p.as_i64())
            .collect();
        assert!(pids.contains(&(holder.pid() as i64)), "{v}");
        let end = |extra: &[&str]| {
            Command::new(exe())
                .args(["end", "cli-a", "--root"])
                .arg(fx.root())
                .args(extra)
                .output()
                .unwrap()
        };
        let out = end(&[]);
        assert!(!out.status.success(), "end refused while used");
        assert!(String::from_utf8_lossy(&out.stderr).contains("still used by"));
        drop(holder);
        let out = end(&["--discard"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(fx.latest("cli"), "0", "--discard wrote nothing back");
        assert!(!fx.is_mounted(&m));
        assert!(fx.record("cli-a").session.is_none());
    }
}

#[test]
fn a_failed_last_unmount_is_recorded_and_retried() {
    each(CommitMode::Replace, |fx| {
        fx.create("fu-a", &[]);
        let m = fx.mount("fu-a", "X");
        fs::write(m.join("f"), "x").unwrap();
        // Make the commit fail: the cache state cannot be read.
        let state = fx.root().join("lower/fu/cache-state.json");
        let good = fs::read(&state).unwrap();
        fs::write(&state, "{not json").unwrap();
        assert!(fx.driver.unmount("fu-a", "X").is_err(), "the commit fails");
        let rec = fx.record("fu-a");
        let s = rec.session.expect("the session is still recorded");
        assert!(
            s.mounts.is_empty(),
            "the count is gone durably: {:?}",
            s.mounts
        );
        assert!(
            fx.driver.unmount("fu-a", "X").is_err(),
            "a repeated Unmount retries the end, which fails while the cause remains"
        );
        assert!(fx
            .record("fu-a")
            .session
            .is_some_and(|s| s.mounts.is_empty()));
        // Once the cause is fixed, the sweep finishes the job.
        fs::write(&state, good).unwrap();
        assert_eq!(fx.driver.sweep(), Some(1));
        assert_eq!(fx.latest("fu"), "a");
        assert!(fx.root().join("lower/fu/a/f").exists());
        assert!(fx.record("fu-a").session.is_none());
    });
}
