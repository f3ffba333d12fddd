//! Aging benchmark (issue 11): does a cache stay fast and small after months of commits?
//! `cargo bench --bench aging` (as root; `-- --quick` for a short run).
//!
//! One seed layer of `FILES` small files, then commits through the driver (kernel backend), each
//! rewriting one 256 KiB file, as a build rewrites an index. Scenarios:
//! - depth 1: the seed alone;
//! - depth 16: 15 commits;
//! - N commits with the server's maintenance pass after each (compaction + GC, as `serve` runs);
//! - N commits with compaction off (no maintenance), at most 450: deeper chains cannot be mounted.
//!
//! For each: Mount latency (median over `REPS` fresh sessions) on the kernel and FUSE backends,
//! the FUSE metadata walk of the whole tree on a fresh mount (median), the chain depth, and the
//! disk the layers take (each inode once) against the live data (the tree a session sees).
//! Prints a table with ratios against depth 1 (targets: ≤ 1.5) and disk against live data
//! (target: ≤ 2), and writes `target/bench/aging.json`. A scenario whose chain the kernel cannot
//! mount (over 500 layers) is reported as such, not hidden.
//! Env: `AGING_COMMITS` (1000; 150 with --quick), `AGING_FILES` (5000; 1000), `AGING_REPS` (7; 3),
//! `BENCH_DIR` (scratch parent).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cachedriver::backend::BackendKind;
use cachedriver::budget::{cache_usage, UsageMemo};
use cachedriver::driver::{Config, Driver};
use cachedriver::maintenance::{run_once, Settings};
use cachedriver::names::CommitMode;
use cachedriver::store::Store;

#[path = "support/scratch.rs"]
mod scratch;

use scratch::{walk, Unmounter};

const CACHE: &str = "age";

/// Commits of the compaction-off run: its chain must stay mountable (the kernel's limit is 500).
const OFF_MAX: usize = 450;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [Duration]) -> Option<Duration> {
    v.sort();
    v.get(v.len() / 2).copied()
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2}", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "fails".into())
}

fn ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.as_nanos() > 0 => {
            format!("{:.2}", a.as_secs_f64() / b.as_secs_f64())
        }
        _ => "-".into(),
    }
}

struct Scenario {
    _dir: tempfile::TempDir,
    _unmount: Unmounter,
    kernel: Driver,
    fuse: Driver,
    next: std::cell::Cell<usize>,
}

impl Scenario {
    fn new(parent: &Path, files: usize, exe: &Path) -> Scenario {
        let dir = tempfile::tempdir_in(parent).expect("tempdir");
        let seed = dir.path().join("lower").join(CACHE).join("seed");
        for i in 0..files {
            let d = seed.join(format!("g{:03}/h{:02}", i / 1000, (i / 100) % 10));
            if i % 100 == 0 {
                fs::create_dir_all(&d).expect("mkdir");
            }
            fs::write(d.join(format!("f{i}.jar")), format!("content {i}\n")).expect("write");
        }
        fs::write(
            dir.path()
                .join("lower")
                .join(CACHE)
                .join("cache-state.json"),
            r#"{"state":{"latest":"seed"}}"#,
        )
        .expect("state");
        let driver = |backend| {
            Driver::new(
                Store::open(dir.path()).expect("store"),
                Config {
                    backend,
                    commit: CommitMode::Replace,
                    exe: exe.to_path_buf(),
                },
            )
            .expect("driver")
        };
        Scenario {
            kernel: driver(BackendKind::Kernel),
            fuse: driver(BackendKind::Fuse),
            _unmount: Unmounter(dir.path().to_path_buf()),
            _dir: dir,
            next: Default::default(),
        }
    }

    fn name(&self) -> String {
        let n = self.next.get();
        self.next.set(n + 1);
        format!("{CACHE}-s{n}")
    }

    /// One session through the kernel driver that rewrites `data.bin` (256 KiB). Fails where
    /// Mount does (a chain over the kernel's 500 layers).
    fn commit(&self, i: usize) -> Result<(), String> {
        let name = self.name();
        let k = &self.kernel;
        k.create(&name, &BTreeMap::new())
            .map_err(|e| e.to_string())?;
        let m = k.mount(&name, "x").map_err(|e| e.to_string())?;
        fs::write(m.join("data.bin"), vec![(i % 251) as u8; 256 << 10]).expect("write");
        k.unmount(&name, "x").map_err(|e| e.to_string())?;
        k.remove(&name).map_err(|e| e.to_string())
    }

    /// `n` commits, each followed by `after`; stops at the first failure and says so.
    fn commits(&self, n: usize, mut after: impl FnMut()) -> (usize, Option<String>) {
        for i in 0..n {
            if let Err(e) = self.commit(i) {
                eprintln!("commit {i} failed: {e}");
                return (i, Some(e));
            }
            after();
        }
        (n, None)
    }

    fn depth(&self) -> usize {
        let s = self.kernel.store().load_state(CACHE).ok().flatten();
        let Some(s) = s else { return 0 };
        let mut n = 1;
        let mut cur = s.state.latest.clone();
        while let Some(p) = s.layers.get(&cur).and_then(|l| l.parent.clone()) {
            n += 1;
            cur = p;
        }
        n
    }

    /// Median Mount latency of fresh sessions (each unmounted unchanged: no commit).
    fn mount_latency(&self, d: &Driver, reps: usize) -> Result<Duration, String> {
        let mut v = Vec::new();
        for _ in 0..reps {
            let name = self.name();
            d.create(&name, &BTreeMap::new())
                .map_err(|e| e.to_string())?;
            let t = Instant::now();
            let r = d.mount(&name, "x");
            let el = t.elapsed();
            r.map_err(|e| e.to_string())?;
            v.push(el);
            d.unmount(&name, "x").map_err(|e| e.to_string())?;
            d.remove(&name).map_err(|e| e.to_string())?;
        }
        median(&mut v).ok_or_else(|| "no reps".into())
    }

    /// Median time to stat every entry of the tree through a fresh FUSE mount.
    fn fuse_walk(&self, reps: usize) -> Result<(Duration, usize), String> {
        let mut v = Vec::new();
        let mut entries = 0;
        for _ in 0..reps {
            let name = self.name();
            let d = &self.fuse;
            d.create(&name, &BTreeMap::new())
                .map_err(|e| e.to_string())?;
            let m = d.mount(&name, "x").map_err(|e| e.to_string())?;
            let t = Instant::now();
            entries = walk(&m);
            v.push(t.elapsed());
            d.unmount(&name, "x").map_err(|e| e.to_string())?;
            d.remove(&name).map_err(|e| e.to_string())?;
        }
        Ok((median(&mut v).unwrap_or_default(), entries))
    }

    /// Bytes a session sees (the live data), through a kernel mount.
    fn live_bytes(&self) -> Option<u64> {
        let name = self.name();
        let d = &self.kernel;
        d.create(&name, &BTreeMap::new()).ok()?;
        let m = d.mount(&name, "x").ok()?;
        let (bytes, _) = cachedriver::fsutil::tree_usage(&m);
        d.unmount(&name, "x").ok()?;
        d.remove(&name).ok()?;
        Some(bytes)
    }

    fn disk(&self) -> u64 {
        cache_usage(self.kernel.store(), CACHE, &mut UsageMemo::default())
    }
}

struct Row {
    label: String,
    depth: usize,
    kernel_mount: Result<Duration, String>,
    fuse_mount: Result<Duration, String>,
    walk: Result<(Duration, usize), String>,
    disk: u64,
    live: Option<u64>,
    build: Duration,
}

fn measure(label: String, s: &Scenario, reps: usize, build: Duration) -> Row {
    eprintln!("measuring {label} (depth {})", s.depth());
    Row {
        depth: s.depth(),
        kernel_mount: s.mount_latency(&s.kernel, reps),
        fuse_mount: s.mount_latency(&s.fuse, reps),
        walk: s.fuse_walk(reps),
        disk: s.disk(),
        live: s.live_bytes(),
        label,
        build,
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("aging bench: needs root (it mounts overlays and FUSE); nothing measured");
        std::process::exit(1);
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let commits = env_usize("AGING_COMMITS", if quick { 150 } else { 1000 });
    let files = env_usize("AGING_FILES", if quick { 1000 } else { 5000 });
    let reps = env_usize("AGING_REPS", if quick { 3 } else { 7 });
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    let parent = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("bench-scratch"));
    fs::create_dir_all(&parent).expect("scratch dir");
    // The binary with the `fuse` subcommand (cargo builds it for benches).
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_cachedriver"));
    let settings = Settings::default();
    let mut rows = Vec::new();
    let mut notes: Vec<(usize, String)> = Vec::new();

    let t = Instant::now();
    let s = Scenario::new(&parent, files, &exe);
    rows.push(measure("depth 1".into(), &s, reps, t.elapsed()));
    drop(s);

    let t = Instant::now();
    let s = Scenario::new(&parent, files, &exe);
    s.commits(15, || {});
    rows.push(measure("depth 16".into(), &s, reps, t.elapsed()));
    drop(s);

    let t = Instant::now();
    let s = Scenario::new(&parent, files, &exe);
    let mut memo = UsageMemo::default();
    let (done, err) = s.commits(commits, || {
        let r = run_once(
            s.kernel.store(),
            &settings,
            Some(&[CACHE.to_string()]),
            &mut memo,
        );
        if !r.errors.is_empty() {
            eprintln!("maintenance errors: {:?}", r.errors);
        }
    });
    let stopped = |done: usize, err: Option<String>| {
        err.map(|e| format!(" (commit {} failed: {e})", done + 1))
            .unwrap_or_default()
    };
    rows.push(measure(
        format!(
            "{done} commits, compaction on (bound {})",
            settings.compact_depth
        ),
        &s,
        reps,
        t.elapsed(),
    ));
    notes.push((rows.len() - 1, stopped(done, err)));
    drop(s);

    let t = Instant::now();
    let s = Scenario::new(&parent, files, &exe);
    // Without compaction the kernel refuses chains over 500 layers: stop where it still mounts.
    let (done, err) = s.commits(commits.min(OFF_MAX), || {});
    rows.push(measure(
        format!("{done} commits, compaction off"),
        &s,
        reps,
        t.elapsed(),
    ));
    notes.push((rows.len() - 1, stopped(done, err)));
    drop(s);

    let base_k = rows[0].kernel_mount.clone().ok();
    let base_f = rows[0].fuse_mount.clone().ok();
    let base_w = rows[0].walk.clone().ok().map(|w| w.0);
    println!(
        "\naging: {files} seed files, commits rewrite one 256 KiB file, {reps} reps (medians)\n"
    );
    println!("| scenario | depth | kernel Mount ms | ratio | FUSE Mount ms | ratio | FUSE walk ms | ratio | disk MiB | live MiB | disk/live | build s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mut json = Vec::new();
    let mut notes_out = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if let Some((_, n)) = notes.iter().find(|(j, n)| *j == i && !n.is_empty()) {
            notes_out.push(format!("{}:{n}", r.label));
        }
        let k = r.kernel_mount.clone().ok();
        let f = r.fuse_mount.clone().ok();
        let w = r.walk.clone().ok().map(|w| w.0);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {:.0} |",
            r.label,
            r.depth,
            ms(k),
            ratio(k, base_k),
            ms(f),
            ratio(f, base_f),
            ms(w),
            ratio(w, base_w),
            mib(r.disk),
            r.live
                .map(|l| format!("{:.1}", mib(l)))
                .unwrap_or("-".into()),
            r.live
                .map(|l| format!("{:.2}", r.disk as f64 / l.max(1) as f64))
                .unwrap_or("-".into()),
            r.build.as_secs_f64()
        );
        let mut said = Vec::new();
        for (what, e) in [
            ("kernel Mount", r.kernel_mount.as_ref().err()),
            ("FUSE Mount", r.fuse_mount.as_ref().err()),
            ("FUSE walk", r.walk.as_ref().err()),
        ] {
            if let Some(e) = e {
                said.push(format!("{what} failed: {e}"));
            }
        }
        said.dedup_by(|a, b| a.split_once(':').map(|x| x.1) == b.split_once(':').map(|x| x.1));
        notes_out.extend(said.into_iter().map(|n| format!("{}: {n}", r.label)));
        json.push(serde_json::json!({
            "scenario": r.label, "depth": r.depth,
            "kernel_mount_ms": k.map(|d| d.as_secs_f64() * 1000.0),
            "fuse_mount_ms": f.map(|d| d.as_secs_f64() * 1000.0),
            "fuse_walk_ms": w.map(|d| d.as_secs_f64() * 1000.0),
            "walk_entries": r.walk.as_ref().ok().map(|w| w.1),
            "disk_bytes": r.disk, "live_bytes": r.live, "build_s": r.build.as_secs_f64(),
            "errors": [r.kernel_mount.as_ref().err(), r.fuse_mount.as_ref().err(), r.walk.as_ref().err()],
        }));
    }
    for n in &notes_out {
        println!("- {n}");
    }
    let on = &rows[2];
    let off = &rows[3];
    println!(
        "\ndisk after the commit runs: compaction on {:.1} MiB, off {:.1} MiB ({:.2}x); targets: Mount/walk ratio <= 1.5, disk/live <= 2",
        mib(on.disk),
        mib(off.disk),
        off.disk as f64 / on.disk.max(1) as f64
    );
    let out = target.join("bench");
    let _ = fs::create_dir_all(&out);
    let _ = fs::write(
        out.join("aging.json"),
        serde_json::to_vec_pretty(&json).unwrap_or_default(),
    );
    println!("wrote {}", out.join("aging.json").display());
}
