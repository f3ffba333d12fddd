//! A driver over a temp root on every backend that works here, for integration tests
//! (`#[path = "support/driver_fixture.rs"] mod driver_fixture;`), with the helpers around it:
//! the skip-or-fail probe (re-exported from `probe.rs`: without root or a backend the tests say
//! so loudly, and under `CI=true` or `CACHEDRIVER_REQUIRE_ALL=1` that is a failure), the
//! unmount-everything drop guard, a stand-in container, and a snapshot of a root's records.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use cachedriver::backend::BackendKind;
use cachedriver::driver::{Config, Driver};
use cachedriver::names::CommitMode;
use cachedriver::store::Store;

#[path = "probe.rs"]
mod probe;
#[path = "unmount.rs"]
mod unmount;

// Tests reach the probe through the fixture; each uses its own subset.
#[allow(unused_imports)]
pub use probe::{backends, exe, is_root, skip, strict};
pub use unmount::unmount_below;

/// A driver over `root`; unmounts anything left under `root/merged` on drop.
pub struct Fixture {
    /// The store root.
    pub root: PathBuf,
    /// The driver.
    pub driver: Driver,
    /// Its backend.
    pub kind: BackendKind,
    /// The default commit mode.
    pub mode: CommitMode,
    /// The temp dir holding `root` when the fixture made it (removed after the unmounts).
    tmp: Option<tempfile::TempDir>,
}

impl Fixture {
    /// A driver on a fresh temp root of its own.
    pub fn new(kind: BackendKind, mode: CommitMode) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut f = Self::at(tmp.path(), kind, mode);
        f.tmp = Some(tmp);
        f
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A driver on `root` (created if needed).
    pub fn at(root: &Path, kind: BackendKind, mode: CommitMode) -> Self {
        let driver = Self::driver_at(root, kind, mode);
        Fixture {
            root: root.to_path_buf(),
            driver,
            kind,
            mode,
            tmp: None,
        }
    }

    fn driver_at(root: &Path, kind: BackendKind, mode: CommitMode) -> Driver {
        let store = Store::open(root).expect("store");
        Driver::new(
            store,
            Config {
                backend: kind,
                commit: mode,
                exe: exe(),
            },
        )
        .expect("driver")
    }

    /// A new driver on the same root, as after a plugin restart (opening the store again).
    pub fn restart(&mut self) {
        self.driver = Self::driver_at(&self.root, self.kind, self.mode);
    }

    /// Creates a volume.
    pub fn create(&self, name: &str, opts: &[(&str, &str)]) {
        let o: BTreeMap<String, String> = opts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.driver.create(name, &o).expect("create");
    }

    /// Mounts a volume for mount ID `id`.
    pub fn mount(&self, name: &str, id: &str) -> PathBuf {
        self.driver
            .mount(name, id)
            .unwrap_or_else(|e| panic!("mount {name}: {e}"))
    }

    /// Unmounts (and on the last, commits).
    pub fn unmount(&self, name: &str, id: &str) {
        self.driver
            .unmount(name, id)
            .unwrap_or_else(|e| panic!("unmount {name}: {e}"))
    }

    /// The cache's `state.latest`.
    pub fn latest(&self, cache: &str) -> String {
        let p = self.root.join("lower").join(cache).join("cache-state.json");
        let s: serde_json::Value =
            serde_json::from_slice(&fs::read(&p).expect("state")).expect("json");
        s["state"]["latest"].as_str().expect("latest").to_string()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        unmount_below(&self.root.join("merged"));
    }
}

/// Every durable record under a store root (names and file contents, sorted), to prove that a
/// dry run or a refused request changed nothing. The maintenance lock file (created empty by
/// the first locker) is not a record.
pub fn durable_state(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    for sub in ["volumes", "lower"] {
        let mut stack = vec![root.join(sub)];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if e.file_type().unwrap().is_dir() {
                    stack.push(p.clone());
                    out.push((p, vec![]));
                } else {
                    out.push((p.clone(), fs::read(&p).unwrap_or_default()));
                }
            }
        }
    }
    out.retain(|(p, _)| !p.ends_with(cachedriver::store::MAINTENANCE_FILE));
    out.sort();
    out
}

/// A stand-in for a running container: a child process whose cwd is in the view (the plugin's
/// own process never counts as a user of a view, so without one a restart ends the session).
/// Killed on drop.
pub struct Holder(std::process::Child);

impl Holder {
    /// Starts a `sleep` whose cwd is `view`.
    pub fn new(view: &Path) -> Self {
        Holder(
            std::process::Command::new("sleep")
                .arg("600")
                .current_dir(view)
                .spawn()
                .expect("spawning sleep"),
        )
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
