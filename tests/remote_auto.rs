//! Automatic mode (`serve --remote REPO`) against a real registry: a commit on host A is pushed
//! in the background; the first session of the cache on host B starts from it; a cache the
//! registry does not have starts empty. Its own test binary: the mode is process-wide.

#[path = "support/driver_fixture.rs"]
mod driver_fixture;
#[path = "support/registry.rs"]
mod registry;

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use cachedriver::names::CommitMode;
use cachedriver::remote::{auto, Access};
use driver_fixture::{backends, Fixture};
use registry::Registry;

#[test]
fn first_session_pulls_and_commits_push_in_background() {
    let Some(reg) = Registry::start(None) else {
        return;
    };
    let Some(kind) = backends("remote_auto").into_iter().next() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("config.json");
    fs::write(&cfg, "{}").unwrap();
    auto::install(auto::Auto {
        repo: reg.repo("auto/caches"),
        access: Access {
            auth_file: Some(cfg),
            insecure: false,
            concurrency: 2,
        },
        pull_timeout: Duration::from_secs(30),
    });
    let a = Fixture::at(&tmp.path().join("a"), kind, CommitMode::Replace);
    let b = Fixture::at(&tmp.path().join("b"), kind, CommitMode::Replace);

    // A: cold cache, nothing in the registry: starts empty, no error.
    a.create("ivy-one", &[]);
    let m = a.mount("ivy-one", "x");
    assert_eq!(fs::read_dir(&m).unwrap().count(), 0);
    fs::write(m.join("from-a.txt"), b"built on A").unwrap();
    a.unmount("ivy-one", "x");
    assert!(
        auto::wait_idle(Duration::from_secs(60)),
        "background push hung"
    );
    assert!(reg.blob_puts() >= 2, "nothing pushed: {}", reg.log());

    // B: the first session starts from A's snapshot.
    b.create("ivy-b1", &[]);
    let m = b.mount("ivy-b1", "y");
    let got: PathBuf = m.join("from-a.txt");
    assert_eq!(fs::read(&got).unwrap(), b"built on A");
    b.unmount("ivy-b1", "y");
}
