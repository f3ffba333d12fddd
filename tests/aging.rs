//! A cache that lives for months (issue 11): many sessions through the protocol with the
//! maintenance pass the server runs after each commit (compaction + GC), garbage collection
//! around live sessions, the disk budget, and the `gc`/`rm`/`ls`/`serve` command lines.
//!
//! Runs on every backend that works here, like tests/store_commit.rs: without root or a
//! backend the tests say so loudly, and under `CI=true` or `CACHEDRIVER_REQUIRE_ALL=1` that is a
//! failure. `AGING_SESSIONS` sets the length of the long test (default 1000; under 600, which is
//! past the kernel's 500-layer limit, only outside CI and with a loud note).

#[path = "support/driver_fixture.rs"]
mod driver_fixture;

use driver_fixture::{durable_state, exe, strict};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use cachedriver::backend::BackendKind;
use cachedriver::budget::{self, Policy, UsageMemo};
use cachedriver::gc::gc_cache;
use cachedriver::maintenance::{self, Settings};
use cachedriver::names::CommitMode;
use cachedriver::protocol::{self, Endpoint};
use cachedriver::store::{Session, Store, VolumeRecord};
use serde_json::{json, Value};

/// Backends usable here; loud (or fatal under CI) about the ones that are not.
fn backends() -> Vec<BackendKind> {
    driver_fixture::backends("aging")
}

/// A driver over a temp root (the shared fixture, which unmounts what is left on drop), driven
/// through the protocol.
struct Fixture {
    base: driver_fixture::Fixture,
    memo: std::cell::RefCell<UsageMemo>,
}

impl Fixture {
    fn new(kind: BackendKind) -> Self {
        Fixture {
            base: driver_fixture::Fixture::new(kind, CommitMode::Replace),
            memo: Default::default(),
        }
    }

    fn root(&self) -> &Path {
        self.base.root()
    }

    fn store(&self) -> &Store {
        self.base.driver.store()
    }

    fn call(&self, ep: Endpoint, body: Value) -> Value {
        let r = protocol::handle(&self.base.driver, ep, body.to_string().as_bytes());
        assert_eq!(r.status, 200, "{ep:?} {body}: {:?}", r.body);
        r.body
    }

    fn create(&self, name: &str, opts: &[(&str, &str)]) {
        let o: BTreeMap<&str, &str> = opts.iter().copied().collect();
        self.call(Endpoint::Create, json!({"Name": name, "Opts": o}));
    }

    fn mount(&self, name: &str, id: &str) -> PathBuf {
        let b = self.call(Endpoint::Mount, json!({"Name": name, "ID": id}));
        PathBuf::from(b["Mountpoint"].as_str().expect("Mountpoint"))
    }

    fn unmount(&self, name: &str, id: &str) {
        self.call(Endpoint::Unmount, json!({"Name": name, "ID": id}));
    }

    fn remove(&self, name: &str) {
        self.call(Endpoint::Remove, json!({"Name": name}));
    }

    /// One whole session: create, mount, `f(view)`, unmount.
    fn session(&self, name: &str, f: impl FnOnce(&Path)) {
        self.create(name, &[]);
        let m = self.mount(name, "c");
        f(&m);
        self.unmount(name, "c");
    }

    fn latest_chain(&self, cache: &str) -> Vec<String> {
        self.store()
            .load_state(cache)
            .expect("state")
            .expect("cache exists")
            .latest_chain()
            .expect("chain")
    }

    /// The pass the server's worker runs after a commit.
    fn maintain(&self, cache: &str, settings: &Settings) {
        let r = maintenance::run_once(
            self.store(),
            settings,
            Some(&[cache.to_string()]),
            &mut self.memo.borrow_mut(),
        );
        assert!(r.errors.is_empty(), "maintenance errors: {:?}", r.errors);
    }

    fn disk(&self, cache: &str) -> u64 {
        budget::cache_usage(self.store(), cache, &mut self.memo.borrow_mut())
    }
}

fn set_used(store: &Store, cache: &str, ago: Duration) {
    let p = store.cache_dir(cache).join(budget::USED_FILE);
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .unwrap();
    f.set_modified(SystemTime::now() - ago).unwrap();
}

fn sessions_wanted() -> usize {
    let n: usize = std::env::var("AGING_SESSIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    if n < 600 {
        assert!(
            !strict(),
            "AGING_SESSIONS={n}: CI runs at least 600 (past the kernel's 500 layers)"
        );
        eprintln!("\n*** aging: only {n} sessions (AGING_SESSIONS): not past the kernel's 500-layer limit ***\n");
    }
    n
}

#[test]
fn a_thousand_sessions_stay_bounded_and_an_old_merge_session_keeps_its_view() {
    let n = sessions_wanted();
    let settings = Settings::default();
    for kind in backends() {
        let t0 = Instant::now();
        let fx = Fixture::new(kind);
        // A merge-mode session on the first snapshot, mounted through everything that follows.
        fx.session("age-seed", |m| {
            fs::write(m.join("seed.txt"), "seed").unwrap()
        });
        fx.create("age-old", &[("commit", "merge")]);
        let old = fx.mount("age-old", "held");
        fs::write(old.join("old.txt"), "from the old session").unwrap();
        let mut max_depth = 0;
        let mut max_disk = 0;
        for i in 0..n {
            let name = format!("age-s{i:04}");
            fx.session(&name, |m| {
                // What a build does to a cache: rewrite an index file, add an artifact.
                fs::write(m.join("index.bin"), vec![(i % 251) as u8; 64 << 10]).unwrap();
                fs::create_dir_all(m.join("artifacts")).unwrap();
                fs::write(m.join(format!("artifacts/a{i:04}")), format!("{i}")).unwrap();
            });
            fx.remove(&name); // as `docker run --rm` does
            fx.maintain("age", &settings);
            let depth = fx.latest_chain("age").len();
            assert!(
                depth <= settings.compact_depth,
                "{}: after session {i} and maintenance the latest chain is {depth} deep, over --compact-depth {}",
                kind.as_str(),
                settings.compact_depth
            );
            max_depth = max_depth.max(depth);
            if i % 50 == 49 {
                max_disk = max_disk.max(fx.disk("age"));
                // The old session's view never moved.
                assert_eq!(fs::read_to_string(old.join("seed.txt")).unwrap(), "seed");
                assert!(
                    !old.join("index.bin").exists(),
                    "old view saw a later commit"
                );
            }
        }
        let live = {
            fx.create("age-check", &[]);
            let m = fx.mount("age-check", "c");
            let (bytes, entries) = cachedriver::fsutil::tree_usage(&m);
            assert_eq!(
                fs::read_dir(m.join("artifacts")).unwrap().count(),
                n,
                "every session's artifact is in the latest snapshot"
            );
            assert_eq!(
                fs::read(m.join("index.bin")).unwrap()[0],
                ((n - 1) % 251) as u8
            );
            fx.unmount("age-check", "c");
            fx.remove("age-check");
            eprintln!("live data: {bytes} bytes in {entries} entries");
            bytes
        };
        // Superseded versions of index.bin are gone: disk stays near the live data.
        let budget = 2 * live + (settings.compact_depth as u64 + 2) * (80 << 10);
        assert!(
            max_disk <= budget,
            "{}: layers took {max_disk} bytes for {live} bytes of live data (budget {budget})",
            kind.as_str()
        );
        // The old merge session still has its snapshot and merges on top of everything.
        assert_eq!(
            fs::read_to_string(old.join("old.txt")).unwrap(),
            "from the old session"
        );
        fx.unmount("age-old", "held");
        fx.maintain("age", &settings);
        fx.session("age-after", |m| {
            assert_eq!(
                fs::read_to_string(m.join("old.txt")).unwrap(),
                "from the old session"
            );
            assert_eq!(fs::read_dir(m.join("artifacts")).unwrap().count(), n);
        });
        eprintln!(
            "aging {}: {n} sessions in {:.1}s, max depth {max_depth}, max disk {max_disk} bytes, live {live} bytes",
            kind.as_str(),
            t0.elapsed().as_secs_f64()
        );
    }
}

#[test]
fn gc_keeps_a_live_sessions_lowers_and_collects_replace_losers() {
    for kind in backends() {
        let fx = Fixture::new(kind);
        fx.create("g-a", &[]);
        fx.create("g-b", &[]);
        let a = fx.mount("g-a", "1");
        let b = fx.mount("g-b", "2");
        fs::write(a.join("a.txt"), "a").unwrap();
        fs::write(b.join("b.txt"), vec![7u8; 256 << 10]).unwrap();
        fx.unmount("g-a", "1"); // latest a
        fx.create("g-c", &[]);
        let c = fx.mount("g-c", "3"); // on [a, 0]
        fx.unmount("g-b", "2"); // replace: latest b on 0; a now only needed by c
        assert_eq!(fx.latest_chain("g"), vec!["b", "0"]);

        let before = durable_state(fx.root());
        let dry = gc_cache(fx.store(), "g", true).unwrap();
        assert_eq!(durable_state(fx.root()), before, "dry run changed nothing");
        assert!(dry.deleted.is_empty(), "{dry:?}");
        assert_eq!(dry.kept_for_sessions, vec!["a"]);

        let r = gc_cache(fx.store(), "g", false).unwrap();
        assert!(r.deleted.is_empty(), "{r:?}");
        assert!(fx.root().join("lower/g/a").is_dir());
        assert_eq!(
            fs::read_to_string(c.join("a.txt")).unwrap(),
            "a",
            "live view intact"
        );

        // The loser of a later race: c ends empty (no commit), a is garbage now.
        fx.unmount("g-c", "3");
        fx.create("g-d", &[]);
        fx.create("g-e", &[]);
        let d = fx.mount("g-d", "4");
        let e = fx.mount("g-e", "5");
        fs::write(d.join("d.txt"), vec![1u8; 128 << 10]).unwrap();
        fs::write(e.join("e.txt"), "e").unwrap();
        fx.unmount("g-d", "4");
        fx.unmount("g-e", "5"); // latest e on b; d lost
        let dry = gc_cache(fx.store(), "g", true).unwrap();
        assert_eq!(dry.deleted, vec!["a", "d"]);
        let r = gc_cache(fx.store(), "g", false).unwrap();
        assert_eq!(r.deleted, vec!["a", "d"]);
        assert_eq!(r.pruned, vec!["a", "d"]);
        assert_eq!(
            r.bytes_freed, dry.bytes_freed,
            "the dry run predicted the space"
        );
        assert!(r.bytes_freed >= 128 << 10, "{r:?}");
        assert!(!fx.root().join("lower/g/a").exists() && !fx.root().join("lower/g/d").exists());
        let state = fx.store().load_state("g").unwrap().unwrap();
        assert_eq!(
            state.layers.keys().cloned().collect::<Vec<_>>(),
            vec!["0", "b", "e"]
        );
        let leftovers: Vec<_> = fs::read_dir(fx.root().join("lower/g"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".gc-"))
            .collect();
        assert!(leftovers.is_empty());
        fx.session("g-f", |m| {
            assert!(m.join("b.txt").exists() && m.join("e.txt").exists());
        });
    }
}

fn fake_session(lowers: &[&str], committing: Option<&str>) -> Session {
    Session {
        base: lowers[0].to_string(),
        lowers: lowers.iter().map(|s| s.to_string()).collect(),
        backend: BackendKind::Kernel,
        mounts: BTreeMap::from([("x".to_string(), 1)]),
        started_at: "2026-01-01T00:00:00Z".into(),
        pid: None,
        root_attrs: (0, 0, 0o755),
        committing: committing.map(str::to_string),
    }
}

/// GC over records made by hand (no mounts): leftovers of crashes go, a dir that a record's
/// `committing` names stays, a dry run changes nothing, the CLI says the same.
#[test]
fn gc_dry_run_leftovers_and_promotions_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    drop(store.lock_cache("h").unwrap()); // creates the cache dir, as the driver does
    let mut state = store
        .ensure_cache("h", cachedriver::state::XattrNs::Trusted)
        .unwrap();
    let lower = store.cache_dir("h");
    // "live.1": what the live session's commit renamed its upper to before a crash, with no
    // `committing` recorded (kept: named after the session).
    for l in ["one", "two", "lost", "promo", "held", "live.1"] {
        fs::create_dir(lower.join(l)).unwrap();
        fs::write(lower.join(l).join("f"), vec![3u8; 32 << 10]).unwrap();
    }
    state.push_layer("one", "0", "h-one");
    state.push_layer("lost", "0", "h-lost");
    state.push_layer("held", "0", "h-held");
    state.push_layer("two", "one", "h-two");
    state.push_layer("ghost", "0", "h-ghost"); // named, never on disk
    state.state.latest = "two".into();
    store.save_state("h", &state).unwrap();
    for junk in [".tmp-compact1", ".gc-old"] {
        fs::create_dir_all(lower.join(junk).join("sub")).unwrap();
        fs::write(lower.join(junk).join("sub/x"), vec![1u8; 16 << 10]).unwrap();
    }
    fs::write(lower.join(".cache-state.json.tmp-999"), "{").unwrap();
    fs::create_dir(lower.join("not a layer")).unwrap();
    // A session mounted on [held, 0] that was promoting its upper to "promo" when it crashed.
    store
        .save_volume(&VolumeRecord {
            name: "h-live".into(),
            cache: "h".into(),
            id: "live".into(),
            options: BTreeMap::new(),
            commit: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            session: Some(fake_session(&["held", "0"], Some("promo"))),
        })
        .unwrap();

    let before = durable_state(dir.path());
    let out = Command::new(exe())
        .args(["gc", "--dry-run", "--root"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("would delete 1 layer(s) (lost)"), "{text}");
    assert!(text.contains("would free"), "{text}");
    assert_eq!(
        durable_state(dir.path()),
        before,
        "gc --dry-run changed nothing"
    );

    let r = gc_cache(&store, "h", false).unwrap();
    assert_eq!(r.deleted, vec!["lost"]);
    assert_eq!(
        r.leftovers,
        vec![".cache-state.json.tmp-999", ".gc-old", ".tmp-compact1"]
    );
    assert_eq!(r.pruned, vec!["ghost", "lost"]);
    assert!(r.bytes_freed >= (32 + 16 + 16) << 10, "{r:?}");
    for kept in ["0", "one", "two", "held", "promo", "live.1", "not a layer"] {
        assert!(lower.join(kept).is_dir(), "{kept} kept");
    }
    for gone in [
        "lost",
        ".tmp-compact1",
        ".gc-old",
        ".cache-state.json.tmp-999",
    ] {
        assert!(!lower.join(gone).exists(), "{gone} deleted");
    }
    let left: Vec<String> = fs::read_dir(&lower)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".gc-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let s = store.load_state("h").unwrap().unwrap();
    assert_eq!(
        s.layers.keys().cloned().collect::<Vec<_>>(),
        vec!["0", "held", "one", "two"]
    );
    // Idempotent.
    let again = gc_cache(&store, "h", false).unwrap();
    assert!(again.deleted.is_empty() && again.leftovers.is_empty() && again.pruned.is_empty());
}

#[test]
fn budget_evicts_least_recently_used_and_never_a_cache_in_use() {
    let Some(kind) = backends().into_iter().next() else {
        return;
    };
    let fx = Fixture::new(kind);
    for c in ["b1", "b2", "b3", "b4"] {
        fx.session(&format!("{c}-fill"), |m| {
            fs::write(m.join("data"), vec![9u8; 1 << 20]).unwrap()
        });
    }
    fx.create("b1-live", &[]);
    let live = fx.mount("b1-live", "held");
    // b1 is the least recently used but in use; then b2, b3, b4.
    for (c, ago) in [("b1", 400), ("b2", 300), ("b3", 200), ("b4", 100)] {
        set_used(fx.store(), c, Duration::from_secs(ago));
    }
    let mut memo = UsageMemo::default();
    let total: u64 = ["b1", "b2", "b3", "b4"]
        .iter()
        .map(|c| budget::cache_usage(fx.store(), c, &mut memo))
        .sum();
    assert!(total >= 4 << 20, "{total}");
    let policy = Policy {
        max_size: Some((5 << 20) / 2),
        max_idle: None,
    };
    let ev = budget::enforce(fx.store(), &policy, &mut memo).unwrap();
    let names: Vec<&str> = ev.iter().map(|e| e.cache.as_str()).collect();
    assert_eq!(names, vec!["b2", "b3"], "{ev:?}");
    assert!(ev
        .iter()
        .all(|e| e.bytes >= 1 << 20 && e.why.contains("--max-size")));
    assert!(fx.latest_chain("b1").len() == 2 && fx.latest_chain("b4").len() == 2);
    assert_eq!(fs::read(live.join("data")).unwrap().len(), 1 << 20);
    // An evicted cache starts empty, like one that never existed.
    assert!(fx.store().load_state("b2").unwrap().is_none());
    fx.session("b2-again", |m| assert!(!m.join("data").exists()));
    assert_eq!(fx.latest_chain("b2"), vec!["0"]);

    // --max-idle: b4 unused for 10 days goes; b1 is as old but in use.
    set_used(fx.store(), "b4", Duration::from_secs(10 * 86400));
    set_used(fx.store(), "b1", Duration::from_secs(10 * 86400));
    let policy = Policy {
        max_size: None,
        max_idle: Some(Duration::from_secs(7 * 86400)),
    };
    let ev = budget::enforce(fx.store(), &policy, &mut memo).unwrap();
    assert_eq!(
        ev.iter().map(|e| e.cache.as_str()).collect::<Vec<_>>(),
        vec!["b4"]
    );
    assert!(ev[0].why.contains("--max-idle"), "{ev:?}");
    fx.unmount("b1-live", "held");
}

#[test]
fn rm_refuses_a_cache_in_use_naming_the_volume() {
    let Some(kind) = backends().into_iter().next() else {
        return;
    };
    let fx = Fixture::new(kind);
    fx.session("r-one", |m| fs::write(m.join("x"), "x").unwrap());
    fx.create("r-busy", &[]);
    let m = fx.mount("r-busy", "held");
    let rm = || {
        Command::new(exe())
            .args(["rm", "--root"])
            .arg(fx.root())
            .arg("r")
            .output()
            .unwrap()
    };
    let out = rm();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("r-busy") && err.contains("in use"), "{err}");
    assert!(m.join("x").exists());
    fx.unmount("r-busy", "held");
    let out = rm();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!fx.root().join("lower/r").exists());
    fx.session("r-two", |m| assert!(!m.join("x").exists(), "starts empty"));
    let out = Command::new(exe())
        .args(["rm", "--root"])
        .arg(fx.root())
        .arg("nosuch")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cache named"));
}

#[test]
fn the_worker_collects_garbage_after_a_commit() {
    let Some(kind) = backends().into_iter().next() else {
        return;
    };
    let fx = Fixture::new(kind);
    let worker = maintenance::Worker::start(fx.store().clone(), Settings::default()).unwrap();
    fx.base.driver.set_maintenance(worker.notifier());
    fx.create("w-a", &[]);
    fx.create("w-b", &[]);
    let a = fx.mount("w-a", "1");
    let b = fx.mount("w-b", "2");
    fs::write(a.join("a"), "a").unwrap();
    fs::write(b.join("b"), "b").unwrap();
    fx.unmount("w-a", "1");
    fx.unmount("w-b", "2"); // a lost
    let t = Instant::now();
    while fx.root().join("lower/w/a").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the worker did not collect the loser"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    worker.stop();
}

#[test]
fn ls_says_what_is_wrong_and_speaks_json() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for c in ["deep", "ok"] {
        drop(store.lock_cache(c).unwrap());
    }
    let mut s = store
        .ensure_cache("deep", cachedriver::state::XattrNs::Trusted)
        .unwrap();
    let mut parent = "0".to_string();
    for i in 0..520 {
        let l = format!("l{i}");
        s.push_layer(&l, &parent, "deep-x");
        parent = l;
    }
    store.save_state("deep", &s).unwrap();
    store
        .ensure_cache("ok", cachedriver::state::XattrNs::Trusted)
        .unwrap();
    fs::create_dir_all(store.cache_dir("bad")).unwrap();
    fs::write(store.state_path("bad"), "{not json").unwrap();
    let text = cachedriver::ls::render(&store).unwrap();
    assert!(
        text.contains("cache deep: latest l519 (depth 521"),
        "{text}"
    );
    assert!(text.contains("more than the kernel's 500"), "{text}");
    assert!(text.contains("missing on disk"), "{text}");
    assert!(
        text.contains("cache bad:") && text.contains("unreadable"),
        "{text}"
    );
    assert!(!text.contains("0 layers:"), "{text}");
    let out = Command::new(exe())
        .args(["ls", "--json", "--root"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ok = v["caches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "ok")
        .unwrap();
    assert_eq!(ok["depth"], 1);
    assert_eq!(ok["layers"], 1);
    assert!(ok["problems"].as_array().unwrap().is_empty());
    assert!(ok["last_used"].is_string());
}

#[test]
fn bad_budget_flags_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(exe());
        c.arg("serve")
            .arg("--root")
            .arg(dir.path())
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .args(args)
            .env_remove("CACHEDRIVER_MAX_SIZE")
            .env_remove("CACHEDRIVER_MAX_IDLE");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert!(!out.status.success(), "{args:?} {env:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--max-size", "10X"], &[]);
    assert!(
        e.contains("10X") && e.contains("40M") && e.contains("10G"),
        "{e}"
    );
    let e = run(&["--max-idle", "7"], &[]);
    assert!(e.contains("7d") && e.contains("30s"), "{e}");
    let e = run(&[], &[("CACHEDRIVER_MAX_SIZE", "lots")]);
    assert!(e.contains("lots") && e.contains("40M"), "{e}");
    let e = run(&[], &[("CACHEDRIVER_MAX_IDLE", "forever")]);
    assert!(e.contains("forever") && e.contains("12h"), "{e}");
    let e = run(&["--compact-depth", "0"], &[]);
    assert!(e.contains("compact-depth"), "{e}");
    assert!(!dir.path().join("s.sock").exists(), "nothing was served");
}

/// `lock_cache` on a cache dropped while it waited locks the new dir, not the dead one.
#[test]
fn a_lock_waiter_follows_a_dropped_cache() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let held = store.lock_cache("z").unwrap();
    let s2 = store.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _l = s2.lock_cache("z").unwrap();
        use std::os::unix::fs::MetadataExt;
        tx.send(fs::metadata(s2.cache_dir("z")).unwrap().ino())
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    });
    std::thread::sleep(Duration::from_millis(200));
    fs::rename(store.cache_dir("z"), dir.path().join("lower/.gc-z")).unwrap();
    drop(held);
    let ino = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    // The waiter holds the lock of the live dir: a third locker waits for it.
    let t = Instant::now();
    let _third = store.lock_cache("z").unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "lock was not held on the new dir"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(store.cache_dir("z")).unwrap().ino(), ino);
    waiter.join().unwrap();
}

/// `serve` with the budget flags starts its maintenance worker and stops it on SIGTERM.
#[test]
fn serve_runs_the_worker_with_budget_flags() {
    if backends().is_empty() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let child = Command::new(exe())
        .arg("serve")
        .arg("--root")
        .arg(dir.path())
        .arg("--socket")
        .arg(&sock)
        .args([
            "--max-size",
            "1.5G",
            "--max-idle",
            "7d",
            "--compact-depth",
            "8",
        ])
        .env("CACHEDRIVER_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let up = sock.exists();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(up, "serve did not start: {log}");
    assert!(out.status.success(), "{log}");
    assert!(log.contains("maintenance worker started"), "{log}");
    assert!(log.contains("compact_depth=8"), "{log}");
    assert!(log.contains("max_size=Some(1610612736)"), "{log}");
    assert!(log.contains("maintenance worker stopped"), "{log}");
}

/// A GC cut short at each of its steps (error or kill -9) loses nothing the state names and
/// leaves only garbage that the next GC removes. Needs `--features failpoints`.
#[cfg(feature = "failpoints")]
#[test]
fn gc_cut_short_at_each_step_is_finished_by_the_next() {
    for fp in [
        "gc::before_prune_state",
        "gc::before_rename",
        "gc::before_delete",
    ] {
        for action in ["return", "return(abort)"] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            drop(store.lock_cache("k").unwrap());
            let mut state = store
                .ensure_cache("k", cachedriver::state::XattrNs::Trusted)
                .unwrap();
            for l in ["keep", "junk"] {
                fs::create_dir(store.layer_dir("k", l)).unwrap();
                fs::write(store.layer_dir("k", l).join("f"), l).unwrap();
            }
            state.push_layer("junk", "0", "k-junk");
            state.push_layer("keep", "0", "k-keep");
            store.save_state("k", &state).unwrap();
            let out = Command::new(exe())
                .args(["gc", "--root"])
                .arg(dir.path())
                .env("FAILPOINTS", format!("{fp}={action}"))
                .output()
                .unwrap();
            assert!(!out.status.success(), "{fp}={action} did not fire");
            let s = store.load_state("k").unwrap().unwrap();
            assert_eq!(
                s.latest_chain().unwrap(),
                vec!["keep", "0"],
                "{fp}={action}"
            );
            assert_eq!(
                fs::read_to_string(store.layer_dir("k", "keep").join("f")).unwrap(),
                "keep"
            );
            let r = gc_cache(&store, "k", false).unwrap();
            let names: Vec<String> = fs::read_dir(store.cache_dir("k"))
                .unwrap()
                .flatten()
                .filter(|e| e.file_type().unwrap().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let mut names = names;
            names.sort();
            assert_eq!(names, vec!["0", "keep"], "{fp}={action}: {r:?}");
            assert_eq!(
                store.load_state("k").unwrap().unwrap().layers.len(),
                2,
                "{fp}={action}"
            );
        }
    }
}

/// `rm` (the same drop as budget eviction) cut short: before the rename the cache is intact,
/// after it the cache is gone and the next GC deletes the leftover. Needs `--features failpoints`.
#[cfg(feature = "failpoints")]
#[test]
fn rm_cut_short_leaves_the_cache_whole_or_gone() {
    for (fp, gone) in [
        ("budget::before_rename", false),
        ("budget::before_delete", true),
    ] {
        for action in ["return", "return(abort)"] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            drop(store.lock_cache("k").unwrap());
            store
                .ensure_cache("k", cachedriver::state::XattrNs::Trusted)
                .unwrap();
            let out = Command::new(exe())
                .args(["rm", "--root"])
                .arg(dir.path())
                .arg("k")
                .env("FAILPOINTS", format!("{fp}={action}"))
                .output()
                .unwrap();
            assert!(!out.status.success(), "{fp}={action} did not fire");
            assert_eq!(
                store.load_state("k").unwrap().is_none(),
                gone,
                "{fp}={action}"
            );
            let out = Command::new(exe())
                .args(["gc", "--root"])
                .arg(dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let left: Vec<String> = fs::read_dir(dir.path().join("lower"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(
                left,
                if gone { vec![] } else { vec!["k".to_string()] },
                "{fp}={action}"
            );
        }
    }
}

/// With --max-idle, volume records with no session not written for that long are dropped; a
/// record with a live session never is.
#[test]
fn idle_volume_records_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rec = |name: &str, session: Option<Session>| VolumeRecord {
        name: name.into(),
        cache: "v".into(),
        id: name.trim_start_matches("v-").into(),
        options: BTreeMap::new(),
        commit: None,
        created_at: "2026-01-01T00:00:00Z".into(),
        session,
    };
    store.save_volume(&rec("v-old", None)).unwrap();
    store.save_volume(&rec("v-new", None)).unwrap();
    store
        .save_volume(&rec("v-live", Some(fake_session(&["0"], None))))
        .unwrap();
    let age = |name: &str| {
        fs::File::options()
            .write(true)
            .open(dir.path().join("volumes").join(format!("{name}.json")))
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(8 * 86400))
            .unwrap()
    };
    age("v-old");
    age("v-live");
    let dropped = maintenance::prune_idle_volumes(&store, Duration::from_secs(7 * 86400)).unwrap();
    assert_eq!(dropped, vec!["v-old"]);
    let left: Vec<String> = store
        .list_volumes()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(left, vec!["v-live", "v-new"]);
}

/// Two scopes of one cache share layers: GC keeps both chains, `rm`-ing one scope frees only
/// what the other does not use, and the budget drops an idle scope before any whole cache.
#[test]
fn gc_and_budget_with_two_scopes() {
    let Some(kind) = backends().into_iter().next() else {
        return;
    };
    let fx = Fixture::new(kind);
    let write = |name: &str, opts: &[(&str, &str)], file: &str, size: usize| {
        fx.create(name, opts);
        let m = fx.mount(name, "x");
        fs::write(m.join(file), vec![7u8; size]).unwrap();
        fx.unmount(name, "x");
    };
    write(
        "s-main1",
        &[("scope", "main"), ("commit", "merge")],
        "base",
        1 << 20,
    );
    write(
        "s-pr1",
        &[("scope", "pr-1"), ("from", "main"), ("commit", "merge")],
        "pr",
        1 << 20,
    );
    write(
        "s-main2",
        &[("scope", "main"), ("commit", "merge")],
        "more",
        1 << 20,
    );
    let st = fx.store().load_state("s").unwrap().unwrap();
    let main = st.chain(st.scope_latest("main").unwrap()).unwrap();
    let pr = st.chain(st.scope_latest("pr-1").unwrap()).unwrap();
    assert!(
        main.contains(&"main1".to_string()) && pr.contains(&"main1".to_string()),
        "{main:?} {pr:?}"
    );
    assert!(
        !main.contains(&"pr1".to_string()),
        "main's chain holds the PR's layer: {main:?}"
    );
    assert_eq!(st.scopes["pr-1"].forked_from.as_deref(), Some("main"));

    // GC keeps every scope's chain
    let g = cachedriver::gc::gc_cache(fx.store(), "s", false).unwrap();
    assert!(
        g.deleted
            .iter()
            .all(|l| !main.contains(l) && !pr.contains(l)),
        "{g:?}"
    );
    for l in main.iter().chain(pr.iter()) {
        assert!(
            fx.store().layer_dir("s", l).is_dir(),
            "GC deleted {l}, which a scope needs"
        );
    }

    // the budget drops the idle PR scope (its own layer only) before the whole cache
    let mut st = fx.store().load_state("s").unwrap().unwrap();
    st.scopes.get_mut("pr-1").unwrap().updated_at = Some("2020-01-01T00:00:00Z".into());
    fx.store().save_state("s", &st).unwrap();
    let mut memo = UsageMemo::default();
    let total = budget::cache_usage(fx.store(), "s", &mut memo);
    let policy = Policy {
        max_size: Some(total - (1 << 19)),
        max_idle: None,
    };
    let ev = budget::enforce(fx.store(), &policy, &mut memo).unwrap();
    assert_eq!(
        ev.iter().map(|e| e.cache.as_str()).collect::<Vec<_>>(),
        vec!["s:pr-1"],
        "{ev:?}"
    );
    assert!(ev[0].bytes >= 1 << 20, "{ev:?}");
    let st = fx.store().load_state("s").unwrap().unwrap();
    assert!(!st.scopes.contains_key("pr-1") && st.scopes.contains_key("main"));
    assert!(
        !fx.store().layer_dir("s", "pr1").exists(),
        "the dropped scope's layer stays"
    );
    for l in &main {
        assert!(fx.store().layer_dir("s", l).is_dir(), "main lost {l}");
    }
}
