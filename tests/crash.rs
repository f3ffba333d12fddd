//! Failpoint crash harness (issue 12 item 3, DESIGN §6): every `failpoint!("NAME")` in `src/` is
//! found by scanning the source, so failpoints added later are covered without touching this file.
//!
//! For each failpoint and backend, the real `serve` binary runs a scenario over its socket that
//! reaches every step (create, mount, writes through the merged dir, unmount-commit in replace,
//! merge and discard mode, several commits so background compaction and GC run, the `gc` and
//! `compact` commands if they exist, remove). A first pass counts how often the scenario hits the
//! failpoint (`print`); then a sample of those hits is driven twice: error injection
//! (`K*off->1*return->off`) and crash (`K*off->return(abort)`, which `_exit`s like kill -9). After
//! each run the plugin is restarted without failpoints and the invariants are checked:
//!
//! - layer-exists: every layer `cache-state.json` names exists;
//! - layer-complete: a layer made from a session holds exactly what that session wrote (no
//!   half-promoted layer is named);
//! - snapshot-atomic: the latest snapshot mounts (kernel overlay, and a fresh volume through the
//!   backend under test) and shows a version the commits could have produced, never a mix, and
//!   never older than the last acknowledged commit;
//! - docker-ops: Get, List, Mount, Unmount and Remove succeed for every volume;
//! - clean-shutdown: after SIGTERM no temp file, mount or FUSE server is left under the root.
//!
//! Knobs: `CACHEDRIVER_CRASH_ONLY=NAME[,NAME]` (failpoints to drive), `CACHEDRIVER_CRASH_HITS`
//! (hits sampled per failpoint and mode, default 6), `CACHEDRIVER_CRASH_JOBS` (parallel runs,
//! default 3), `CACHEDRIVER_CRASH_DUMP=1` (print every run's plugin logs, for debugging).
#![cfg(feature = "failpoints")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Entry, Plugin};
use serde_json::json;

/// Every failpoint name in `src/**/*.rs`, sorted.
fn discover_failpoints() -> Vec<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("reading src").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = fs::read_to_string(&p).expect("reading source");
                let mut rest = text.as_str();
                while let Some(i) = rest.find("failpoint!(\"") {
                    rest = &rest[i + "failpoint!(\"".len()..];
                    if let Some(end) = rest.find('"') {
                        out.insert(rest[..end].to_string());
                    }
                }
            }
        }
    }
    // The macro's own definition uses `$name`, never a literal, so nothing else matches.
    out.into_iter().collect()
}

const CACHE: &str = "fp";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Replace,
    Merge,
    Discard,
}

type Files = BTreeMap<String, Vec<u8>>;
type Changes = BTreeMap<String, Entry>;

#[derive(Debug, Clone)]
enum Op {
    Create(&'static str, Mode),
    Mount(&'static str, &'static str),
    Write(&'static str),
    Unmount(&'static str, &'static str),
    Maintenance,
    Remove(&'static str),
    /// Keep the view open, as a running container does (until its Unmount).
    Hold(&'static str),
    /// kill -9 the plugin with sessions live; a helper run then cuts a commit of `.0` short
    /// (abort at `commit::before_state`); then what a crash leaves for startup recovery is
    /// planted (see [`plant_leftovers`]), and phase 2 starts: startup recovery has a live
    /// session to keep, a commit to finish, orphan uppers and stale temp files to resolve and
    /// an idle volume record to drop.
    KillAndCutCommit(&'static str, &'static str),
    /// Changes the mode of the view's root (for merge-mode root attributes).
    ChmodRoot(&'static str),
    /// Unmounts the view behind the plugin's back (as a host reboot or a killed FUSE server
    /// does): the next Mount of the session remounts it.
    UnmountBehind(&'static str),
    /// Closes what `Hold` opened without an Unmount: the container is gone; the sweep ends it.
    Release(&'static str),
    /// Waits (for the sweep).
    Sleep(u64),
    /// Waits until the running plugin's startup recovery is done (it runs off the socket's
    /// thread, so requests can come first).
    WaitRecovery,
    /// Runs a CLI command `(label, args)` against the root (error/crash targets by label).
    Cli(&'static str, &'static [&'static str]),
}

/// Volumes whose sessions commit into a scope other than the default one: for the model they
/// never change the latest snapshot.
const SCOPED: &[(&str, &str)] = &[("fp-p1", "pr1")];

/// Volumes whose view is held until the helper run is killed: phase 2 starts with nobody
/// using them, so startup recovery ends them.
const RELEASED_AT_RESTART: &[&str] = &["fp-g1"];

/// Sessions the scenario treats as mounted long before the restart (their records are planted
/// old): startup recovery (fp-g1) and the sweep (fp-s1) end them once nobody uses them.
const MOUNTED_LONG_AGO: &[&str] = &["fp-g1", "fp-s1"];

/// A stale volume record (older than `--max-idle`), dropped by the maintenance worker.
const IDLE_VOLUME: &str = "fp-i1";

/// What the planted non-empty orphan upper holds; committed (merge) by startup recovery.
const ORPHAN_FILE: (&str, &[u8]) = ("orphan.txt", b"or");

/// What each session writes (`Some`) or deletes (`None`) through its merged dir.
fn writes(vol: &str) -> Vec<(&'static str, Option<Vec<u8>>)> {
    let big = |c: u8| Some(vec![c; 64 * 1024]);
    match vol {
        "fp-r1" => vec![
            ("r1.txt", Some(b"r1".to_vec())),
            ("shared.txt", Some(b"r1".to_vec())),
            ("sub/deep/r1.bin", big(b'1')),
        ],
        "fp-m1" => vec![
            ("m1.txt", Some(b"m1".to_vec())),
            ("shared.txt", Some(b"m1".to_vec())),
        ],
        "fp-m2" => vec![
            ("m2.txt", Some(b"m2".to_vec())),
            ("shared.txt", Some(b"m2".to_vec())),
            ("r1.txt", None),
        ],
        "fp-r2" => vec![
            ("r2.txt", Some(b"r2".to_vec())),
            ("shared.txt", Some(b"r2".to_vec())),
            ("sub/deep/r2.bin", big(b'2')),
            ("sub/deep/r1.bin", None),
        ],
        "fp-d1" => vec![("d1.txt", Some(b"d1".to_vec())), ("shared.txt", None)],
        "fp-o1" => vec![("o1.txt", Some(b"o1".to_vec()))],
        "fp-x1" => vec![
            ("x1.txt", Some(b"x1".to_vec())),
            ("shared.txt", Some(b"x1".to_vec())),
        ],
        "fp-r3" => vec![
            ("r3.txt", Some(b"r3".to_vec())),
            ("shared.txt", Some(b"r3".to_vec())),
        ],
        "fp-v1" => vec![("v1.txt", Some(b"v1".to_vec()))],
        "fp-s1" => vec![("s1.txt", Some(b"s1".to_vec()))],
        "fp-g1" => vec![("g1.txt", Some(b"g1".to_vec()))],
        "fp-p1" => vec![("p1.txt", Some(b"p1".to_vec()))],
        _ => vec![],
    }
}

fn script() -> Vec<Op> {
    use Op::*;
    vec![
        Create("fp-r1", Mode::Replace),
        Create("fp-m1", Mode::Merge),
        Create("fp-m2", Mode::Merge),
        Create("fp-r2", Mode::Replace),
        Create("fp-d1", Mode::Discard),
        Create("fp-r3", Mode::Replace),
        Mount("fp-r1", "c1"),
        Write("fp-r1"),
        Unmount("fp-r1", "c1"),
        Mount("fp-m1", "c2"),
        Mount("fp-m2", "c3"),
        Mount("fp-r2", "c4"),
        Write("fp-m1"),
        Write("fp-m2"),
        Write("fp-r2"),
        Mount("fp-d1", "c5"),
        Write("fp-d1"),
        // m1 changes the root's mode; m2 (merge, started before) does not: its commit must
        // keep the mode m1 gave the latest root (commit::root_attrs).
        ChmodRoot("fp-m1"),
        Unmount("fp-m1", "c2"),
        Unmount("fp-m2", "c3"),
        Unmount("fp-d1", "c5"),
        Unmount("fp-r2", "c4"),
        // Docker's `docker cp` pattern: the same volume mounted twice by two IDs.
        Mount("fp-r3", "c6"),
        Mount("fp-r3", "cp"),
        Write("fp-r3"),
        Unmount("fp-r3", "cp"),
        Unmount("fp-r3", "c6"),
        // A session that changes nothing.
        Create("fp-e1", Mode::Replace),
        Mount("fp-e1", "c9"),
        Unmount("fp-e1", "c9"),
        // A view unmounted behind our back: the next Mount remounts it.
        Create("fp-v1", Mode::Merge),
        Mount("fp-v1", "c10"),
        UnmountBehind("fp-v1"),
        Mount("fp-v1", "c11"),
        Write("fp-v1"),
        Unmount("fp-v1", "c11"),
        Unmount("fp-v1", "c10"),
        Create(IDLE_VOLUME, Mode::Replace),
        Create("fp-o1", Mode::Merge),
        Create("fp-x1", Mode::Merge),
        Create("fp-s1", Mode::Merge),
        Mount("fp-s1", "c12"),
        Write("fp-s1"),
        Hold("fp-s1"),
        // Held through the helper run, released before phase 2: startup recovery ends it.
        Create("fp-g1", Mode::Merge),
        Mount("fp-g1", "c14"),
        Write("fp-g1"),
        Hold("fp-g1"),
        Mount("fp-o1", "c7"),
        Write("fp-o1"),
        Hold("fp-o1"),
        Mount("fp-x1", "c8"),
        Write("fp-x1"),
        KillAndCutCommit("fp-x1", "c8"),
        // s1's container is gone without an Unmount: the sweep (every second) ends it.
        WaitRecovery,
        Unmount("fp-g1", "c14"),
        Release("fp-s1"),
        Sleep(2500),
        Unmount("fp-s1", "c12"),
        Unmount("fp-o1", "c7"),
        Maintenance,
        // A scope volume after compaction (no empty bottom layer left), then the scope dropped.
        Create("fp-p1", Mode::Replace),
        Mount("fp-p1", "c13"),
        Write("fp-p1"),
        Unmount("fp-p1", "c13"),
        Cli("rm-scope", &["rm", "fp:pr1"]),
        Remove("fp-r1"),
        Remove("fp-m1"),
        Remove("fp-m2"),
        Remove("fp-r2"),
        Remove("fp-d1"),
        Remove("fp-r3"),
        Remove("fp-o1"),
        Remove("fp-x1"),
        Remove("fp-e1"),
        Remove("fp-v1"),
        Remove("fp-s1"),
        Remove("fp-g1"),
        Remove("fp-p1"),
        Remove(IDLE_VOLUME),
        // Last: the whole cache dropped.
        Cli("rm-cache", &["rm", "fp"]),
    ]
}

/// What a kill -9 at the worst moment leaves, planted while the plugin is down: an orphan
/// upper holding a file and an empty one, a discarded upper half deleted, atomic-write temp files of dead writers (old and new
/// name forms; pid 1 is alive but not ours), and the idle volume record made old.
fn plant_leftovers(root: &Path) -> std::io::Result<()> {
    let up = root.join("upper").join(CACHE);
    let full = up.join(".orphan-planted-1-2026-01-01T00:00:00Z");
    fs::create_dir_all(&full)?;
    fs::write(full.join(ORPHAN_FILE.0), ORPHAN_FILE.1)?;
    fs::create_dir_all(up.join(".orphan-planted-2-2026-01-01T00:00:00Z"))?;
    // A discarded upper whose delete was cut short: never committed, removed.
    fs::create_dir_all(up.join(".discard-planted/sub"))?;
    fs::write(up.join(".discard-planted/sub/gone.txt"), b"no")?;
    let vols = root.join("volumes");
    fs::write(vols.join(".fp-o1.json.tmp-4194302-0"), b"{")?;
    fs::write(vols.join(".fp-o1.json.tmp-1-3"), b"{")?;
    fs::write(vols.join(".fp-x1.json.tmp-4194302"), b"{")?;
    // The idle record, and sessions whose containers go away around the restart: mounted long
    // ago (outside the orphan grace, which keeps a session mounted moments before a restart).
    let old = std::time::SystemTime::now() - Duration::from_secs(3 * 3600);
    for v in std::iter::once(&IDLE_VOLUME).chain(MOUNTED_LONG_AGO) {
        let rec = vols.join(format!("{v}.json"));
        if rec.exists() {
            fs::OpenOptions::new()
                .write(true)
                .open(&rec)?
                .set_modified(old)?;
        }
    }
    Ok(())
}

fn mode_of(vol: &str) -> Mode {
    if SCOPED.iter().any(|(v, _)| *v == vol) {
        return Mode::Discard; // never reaches the default scope's latest
    }
    if vol == "fp-orphan" {
        return Mode::Merge; // recovery commits orphan uppers as merge layers
    }
    script()
        .iter()
        .find_map(|o| match o {
            Op::Create(v, m) if *v == vol => Some(*m),
            _ => None,
        })
        .unwrap_or(Mode::Replace)
}

fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Replace => "replace",
        Mode::Merge => "merge",
        Mode::Discard => "discard",
    }
}

fn apply(base: &Files, ch: &Changes) -> Files {
    let mut out = base.clone();
    for (k, v) in ch {
        match v {
            Entry::File(c) => {
                out.insert(k.clone(), c.clone());
            }
            Entry::Whiteout => {
                out.remove(k);
            }
        }
    }
    out
}

/// A session whose Unmount was not acknowledged: recovery may still commit it.
#[derive(Debug, Clone)]
struct Pending {
    vol: &'static str,
    base: Files,
    changes: Changes,
    /// Mount IDs not yet unmounted.
    ids: Vec<&'static str>,
}

/// What the client knows after the scenario ran (or was cut short).
#[derive(Debug, Default)]
struct Model {
    /// The latest snapshot after the last acknowledged commit.
    latest: Files,
    /// Sessions started (or possibly started) and not acknowledged as ended.
    pending: Vec<Pending>,
    /// What each session wrote, for the layer-complete check.
    changes: BTreeMap<String, Changes>,
    /// Volumes whose Create may have happened.
    created: BTreeSet<&'static str>,
    /// `rm CACHE` may have dropped the cache (the latest snapshot may be empty).
    maybe_dropped: bool,
}

impl Model {
    /// Every latest snapshot recovery could legitimately produce: the acknowledged one with any
    /// of the pending sessions committed on top, in any order.
    fn allowed(&self) -> Vec<Files> {
        let mut out: Vec<Files> = vec![];
        if self.maybe_dropped {
            out.push(Files::new());
        }
        let mut todo: Vec<(Files, Vec<usize>)> = vec![(self.latest.clone(), vec![])];
        while let Some((snap, used)) = todo.pop() {
            if !out.contains(&snap) {
                out.push(snap.clone());
            }
            for (i, p) in self.pending.iter().enumerate() {
                if used.contains(&i) || p.changes.is_empty() {
                    continue;
                }
                let next = match mode_of(p.vol) {
                    Mode::Discard => continue,
                    Mode::Replace => apply(&p.base, &p.changes),
                    Mode::Merge => apply(&snap, &p.changes),
                };
                let mut u = used.clone();
                u.push(i);
                todo.push((next, u));
            }
        }
        out
    }
}

/// Where the failpoint fires in one run.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    /// Count hits only (`print`).
    Count,
    /// The K-th hit (0-based) in the `serve` process of phase 1 (before the kill) or 2.
    Serve { phase: usize, k: usize, crash: bool },
    /// The K-th hit in a maintenance command (`gc`, `compact`).
    Cli { cmd: String, k: usize, crash: bool },
}

impl Target {
    fn spec(k: usize, crash: bool) -> String {
        let pre = if k > 0 {
            format!("{k}*off->")
        } else {
            String::new()
        };
        if crash {
            format!("{pre}return(abort)")
        } else {
            format!("{pre}1*return->off")
        }
    }

    fn label(&self) -> String {
        match self {
            Target::Count => "count".into(),
            Target::Serve { phase, k, crash } => format!(
                "{} serve phase {phase} hit {}",
                if *crash { "crash" } else { "error" },
                k + 1
            ),
            Target::Cli { cmd, k, crash } => format!(
                "{} `{cmd}` hit {}",
                if *crash { "crash" } else { "error" },
                k + 1
            ),
        }
    }

    fn crash(&self) -> bool {
        matches!(
            self,
            Target::Serve { crash: true, .. } | Target::Cli { crash: true, .. }
        )
    }
}

/// The outcome of one run.
#[derive(Debug, Default)]
struct RunResult {
    fired: bool,
    /// Hits in phase 1 and phase 2 of `serve`.
    serve_hits: [usize; 2],
    cli_hits: BTreeMap<String, usize>,
    failures: Vec<String>,
}

fn count_hits(log: &str) -> usize {
    log.lines().filter(|l| l.contains("FPHIT")).count()
}

struct Env {
    backend: &'static str,
    extra: Vec<String>,
    maint_cmds: Vec<String>,
}

/// Runs the scenario with `fp` configured per `target`; then restarts and checks.
fn run_one(env: &Env, fp: &str, target: &Target) -> RunResult {
    let mut res = RunResult::default();
    let mut p = Plugin::new(env.backend, None, &env.extra);
    let serve_fp = |ph: usize| match target {
        Target::Count => Some(format!("{fp}=print(FPHIT)")),
        Target::Serve { phase, k, crash } if *phase == ph => {
            Some(format!("{fp}={}", Target::spec(*k, *crash)))
        }
        _ => None,
    };
    // Which start of the plugin is phase 2 (its log counts phase-2 hits).
    let mut phase2_start = None;
    let mut holds: BTreeMap<&str, Vec<fs::File>> = BTreeMap::new();
    if let Err(e) = p.start(serve_fp(1).as_deref()) {
        if (target.crash() && e.contains("exited during startup")) || e.contains("failpoint") {
            res.fired = true;
        } else {
            res.failures.push(format!("startup with failpoints: {e}"));
            return res;
        }
    }
    let mut model = Model::default();
    let mut mountpoints: BTreeMap<&str, PathBuf> = BTreeMap::new();
    let mut stopped = p.child.is_none();
    let ops = script();
    let mut step = 0;
    while !stopped && step < ops.len() {
        let op = ops[step].clone();
        step += 1;
        let reply = match &op {
            Op::Create(v, m) => {
                model.created.insert(v);
                let mut opts = json!({"commit": mode_str(*m)});
                if let Some((_, scope)) = SCOPED.iter().find(|(x, _)| x == v) {
                    opts["scope"] = json!(scope);
                }
                Some(p.call("/VolumeDriver.Create", json!({"Name": v, "Opts": opts})))
            }
            Op::Mount(v, id) => {
                let joined = model.pending.iter_mut().find(|s| s.vol == *v);
                match joined {
                    Some(s) => s.ids.push(id),
                    None => model.pending.push(Pending {
                        vol: v,
                        base: model.latest.clone(),
                        changes: Changes::new(),
                        ids: vec![id],
                    }),
                }
                let r = p.call("/VolumeDriver.Mount", json!({"Name": v, "ID": id}));
                if let Ok((200, body)) = &r {
                    if let Some(mp) = body["Mountpoint"].as_str() {
                        mountpoints.insert(v, PathBuf::from(mp));
                    }
                }
                Some(r)
            }
            Op::Write(v) => {
                let Some(mp) = mountpoints.get(v) else {
                    res.failures
                        .push(format!("scenario: no mountpoint for {v} before writing"));
                    break;
                };
                for (path, content) in writes(v) {
                    let f = mp.join(path);
                    let r = match &content {
                        Some(c) => fs::create_dir_all(f.parent().expect("parent"))
                            .and_then(|_| fs::write(&f, c)),
                        None => fs::remove_file(&f),
                    };
                    if let Err(e) = r {
                        res.failures.push(format!(
                            "scenario: writing {} through the merged dir of {v}: {e}",
                            f.display()
                        ));
                        break;
                    }
                    let ch = match content {
                        Some(c) => Entry::File(c),
                        None => Entry::Whiteout,
                    };
                    if let Some(s) = model.pending.iter_mut().find(|s| s.vol == *v) {
                        s.changes.insert(path.to_string(), ch.clone());
                    }
                    model
                        .changes
                        .entry(v.to_string())
                        .or_default()
                        .insert(path.to_string(), ch);
                }
                None
            }
            Op::Unmount(v, id) => {
                holds.remove(v); // the container exits before the engine unmounts
                let r = p.call("/VolumeDriver.Unmount", json!({"Name": v, "ID": id}));
                if let Ok((200, _)) = &r {
                    if let Some(i) = model.pending.iter().position(|s| s.vol == *v) {
                        model.pending[i].ids.retain(|x| x != id);
                        if model.pending[i].ids.is_empty() {
                            let s = model.pending.remove(i);
                            if !s.changes.is_empty() {
                                match mode_of(v) {
                                    Mode::Replace => model.latest = apply(&s.base, &s.changes),
                                    Mode::Merge => model.latest = apply(&model.latest, &s.changes),
                                    Mode::Discard => {}
                                }
                            }
                        }
                    }
                }
                Some(r)
            }
            Op::Maintenance => {
                if env.extra.iter().any(|a| a == "--compact-depth") {
                    // Background compaction and GC run after the commits: give them time.
                    std::thread::sleep(Duration::from_millis(1500));
                }
                for cmd in &env.maint_cmds {
                    run_cli(&p, fp, target, cmd, &[cmd.as_str()], &mut res);
                }
                None
            }
            Op::Remove(v) => Some(p.call("/VolumeDriver.Remove", json!({"Name": v}))),
            Op::Cli(label, args) => {
                let drops_cache = args.len() == 2 && args[0] == "rm" && args[1] == CACHE;
                if drops_cache {
                    model.maybe_dropped = true;
                }
                if run_cli(&p, fp, target, label, args, &mut res) && drops_cache {
                    model.latest = Files::new();
                    model.pending.clear();
                    model.changes.clear();
                    model.maybe_dropped = false;
                }
                None
            }
            Op::ChmodRoot(v) => {
                use std::os::unix::fs::PermissionsExt;
                if let Some(mp) = mountpoints.get(v) {
                    if let Err(e) = fs::set_permissions(mp, fs::Permissions::from_mode(0o750)) {
                        res.failures
                            .push(format!("scenario: chmod of the view root of {v}: {e}"));
                        break;
                    }
                }
                None
            }
            Op::UnmountBehind(v) => {
                if let Some(mp) = mountpoints.get(v) {
                    let st = Command::new("umount").arg("-l").arg(mp).status();
                    if !st.as_ref().is_ok_and(|s| s.success()) {
                        res.failures
                            .push(format!("scenario: umount -l {}: {st:?}", mp.display()));
                        break;
                    }
                }
                None
            }
            Op::Release(v) => {
                holds.remove(v);
                None
            }
            Op::Sleep(ms) => {
                std::thread::sleep(Duration::from_millis(*ms));
                None
            }
            Op::WaitRecovery => {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    if let Some(st) = p.try_exit() {
                        // Died in startup recovery: a crash target firing, or a failure.
                        if st.code() == Some(137) && target.crash() {
                            res.fired = true;
                        } else {
                            res.failures.push(format!(
                                "scenario step {op:?}: serve died ({st}) with no failpoint abort"
                            ));
                        }
                        stopped = true;
                        break;
                    }
                    if p.log_of(p.starts()).contains("startup recovery")
                        || Instant::now() >= deadline
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                None
            }
            Op::Hold(v) => {
                if let Some(mp) = mountpoints.get(v) {
                    let h: Vec<fs::File> = [mp.clone(), mp.join(format!("{}.txt", &v[3..]))]
                        .iter()
                        .filter_map(|x| fs::File::open(x).ok())
                        .collect();
                    if std::env::var_os("CACHEDRIVER_CRASH_DUMP").is_some() {
                        eprintln!("HOLD {v} {} {}", mp.display(), h.len());
                    }
                    holds.insert(v, h);
                }
                None
            }
            Op::KillAndCutCommit(v, id) => {
                p.kill9();
                // The helper: aborts in the middle of this commit (or of the startup sweep
                // that commits the orphan first): a commit cut short for recovery to finish.
                match p.start(Some("commit::before_state=return(abort)")) {
                    Ok(()) => {
                        let _ = p.call("/VolumeDriver.Unmount", json!({"Name": v, "ID": id}));
                        if p.wait_exit(Duration::from_secs(2)).is_none() {
                            p.kill9();
                        }
                    }
                    Err(e) if e.contains("exited during startup") => {}
                    Err(e) => res.failures.push(format!("scenario: helper start: {e}")),
                }
                p.kill9();
                for v in RELEASED_AT_RESTART {
                    holds.remove(v);
                }
                if let Err(e) = plant_leftovers(&p.root) {
                    res.failures
                        .push(format!("scenario: planting crash leftovers: {e}"));
                }
                let (f, c) = ORPHAN_FILE;
                model.pending.push(Pending {
                    vol: "fp-orphan",
                    base: model.latest.clone(),
                    changes: Changes::from([(f.to_string(), Entry::File(c.to_vec()))]),
                    ids: vec![],
                });
                phase2_start = Some(p.starts() + 1);
                match p.start(serve_fp(2).as_deref()) {
                    Ok(()) => None,
                    Err(e) => {
                        if e.contains("failpoint")
                            || (target.crash() && e.contains("exited during startup"))
                        {
                            res.fired = true;
                        } else {
                            res.failures.push(format!(
                                "INVARIANT restart: serve does not start after a kill -9 and a commit cut short: {e}"
                            ));
                        }
                        stopped = true;
                        None
                    }
                }
            }
        };
        match reply {
            None | Some(Ok((200, _))) => {}
            Some(Ok((st, body))) => {
                let err = body["Err"].as_str().unwrap_or_default().to_string();
                if err.contains("failpoint") {
                    res.fired = true;
                } else {
                    res.failures.push(format!(
                        "INVARIANT docker-ops: scenario step {op:?} failed ({st}) without the failpoint firing: {body}"
                    ));
                }
                stopped = true;
            }
            Some(Err(e)) => {
                // The connection broke: did the process abort at the failpoint?
                match p.wait_exit(Duration::from_secs(5)) {
                    Some(st) if st.code() == Some(137) && target.crash() => res.fired = true,
                    Some(st) => res.failures.push(format!(
                        "scenario step {op:?}: serve died ({st}) with no failpoint abort: {e}"
                    )),
                    None => res.failures.push(format!(
                        "scenario step {op:?}: request failed but serve still runs: {e}"
                    )),
                }
                stopped = true;
            }
        }
        if res.fired {
            stopped = true;
        }
    }
    // A failpoint in background work (compaction, GC) may fire after the last reply.
    if p.running() {
        if target.crash() {
            if let Some(st) = p.wait_exit(Duration::from_millis(200)) {
                if st.code() == Some(137) {
                    res.fired = true;
                }
            }
        }
    } else if let Some(st) = p.try_exit() {
        if st.code() == Some(137) {
            res.fired = true;
        }
    }
    drop(holds);
    let logs = p.logs();
    if logs.contains(&format!("failpoint {fp}")) {
        res.fired = true;
    }
    // Hits of the helper run (between the phases) are not ours to count.
    let split = phase2_start.unwrap_or(p.starts() + 1);
    for i in 1..=p.starts() {
        let n = count_hits(&p.log_of(i));
        if i < split.saturating_sub(1) || split > p.starts() {
            res.serve_hits[0] += n;
        } else if i >= split {
            res.serve_hits[1] += n;
        }
    }
    if !target.crash() && p.running() {
        // Error injection: the same process keeps serving.
        if let Err(e) = p.ok("/VolumeDriver.List", json!({})) {
            res.failures.push(format!(
                "INVARIANT keeps-serving: List on the same process after the injected error failed: {e}"
            ));
        }
    }
    if p.running() {
        if let Err(e) = p.stop() {
            res.failures
                .push(format!("stopping serve after the scenario: {e}"));
        }
    }
    p.kill9();
    // Restart without failpoints, as after a crash, and check.
    match p.start(None) {
        Ok(()) => check_after_restart(&mut p, &model, &mut res),
        Err(e) => res.failures.push(format!(
            "INVARIANT restart: serve does not start again after the failpoint: {e}"
        )),
    }
    if !res.failures.is_empty() {
        res.failures
            .push(format!("plugin logs (tail):\n{}", p.log_tail()));
    }
    if std::env::var_os("CACHEDRIVER_CRASH_DUMP").is_some() {
        for i in 1..=p.starts() {
            eprintln!("==== {fp} {} start {i}\n{}", target.label(), p.log_of(i));
        }
    }
    res
}

/// Runs `cachedriver ARGS --root ROOT` (hits counted and targets matched under `label`), with
/// the failpoint per `target`; true when it succeeded.
fn run_cli(
    p: &Plugin,
    fp: &str,
    target: &Target,
    label: &str,
    args: &[&str],
    res: &mut RunResult,
) -> bool {
    let log = p.dir.path().join(format!("{label}.log"));
    let mut c = Command::new(common::exe());
    c.args(args)
        .arg("--root")
        .arg(&p.root)
        .env("CACHEDRIVER_LOG", "info")
        .env_remove("FAILPOINTS")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).expect("log"));
    let mut crash_cmd = false;
    match target {
        Target::Count => {
            c.env("FAILPOINTS", format!("{fp}=print(FPHIT)"));
        }
        Target::Cli { cmd: tc, k, crash } if tc == label => {
            c.env("FAILPOINTS", format!("{fp}={}", Target::spec(*k, *crash)));
            crash_cmd = *crash;
        }
        _ => {}
    }
    let st = c.status();
    let text = fs::read_to_string(&log).unwrap_or_default();
    *res.cli_hits.entry(label.to_string()).or_default() += count_hits(&text);
    match st {
        Ok(s) if s.success() => return true,
        Ok(s) if crash_cmd && s.code() == Some(137) => res.fired = true,
        Ok(_) if text.contains(&format!("failpoint {fp}")) => res.fired = true,
        Ok(s) => res.failures.push(format!(
            "scenario: `cachedriver {}` failed ({s}) without the failpoint firing:\n{text}",
            args.join(" ")
        )),
        Err(e) => res
            .failures
            .push(format!("running `cachedriver {}`: {e}", args.join(" "))),
    }
    false
}

fn check_layers(root: &Path, model: &Model, res: &mut RunResult) -> bool {
    if !root
        .join("lower")
        .join(CACHE)
        .join("cache-state.json")
        .exists()
    {
        if !model.latest.is_empty() && !model.maybe_dropped {
            res.failures.push(format!(
                "INVARIANT layer-exists: cache {CACHE} has no cache-state.json although a commit was acknowledged"
            ));
        }
        return false;
    }
    // The restarted plugin's maintenance worker may compact and collect while we look: GC
    // prunes the state before it moves a layer away, so a layer missing from a state read
    // earlier is checked against a fresh read before it counts as broken.
    let mut tries = 0;
    let st = loop {
        match common::check_state(root, CACHE) {
            Ok(s) => break s,
            Err(e) if tries < 3 && e.contains("layer-exists") => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                res.failures.push(e);
                return false;
            }
        }
    };
    let still_named = |name: &str| {
        common::load_state(root, CACHE)
            .map(|s| s["layers"].get(name).is_some())
            .unwrap_or(true)
    };
    for (name, info) in st["layers"].as_object().into_iter().flatten() {
        let Some(vol) = info["session"].as_str() else {
            continue;
        };
        let Some(want) = model.changes.get(vol) else {
            continue;
        };
        let dir = root.join("lower").join(CACHE).join(name);
        match common::read_tree(&dir) {
            Ok(got) if &got == want => {}
            _ if !still_named(name) => {} // collected meanwhile (see above)
            Ok(got) => {
                let files = |t: &Changes| {
                    t.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                match v {
                                    Entry::File(c) => c.clone(),
                                    Entry::Whiteout => b"<whiteout>".to_vec(),
                                },
                            )
                        })
                        .collect::<Files>()
                };
                res.failures.push(format!(
                    "INVARIANT layer-complete: layer {name:?} (session {vol}) named by the state is not what the session wrote (half-promoted?): {}",
                    common::diff(&files(&got), &files(want))
                ));
            }
            Err(e) => res.failures.push(format!(
                "INVARIANT layer-complete: layer {name:?} (session {vol}) cannot be read: {e}"
            )),
        }
    }
    true
}

fn describe(f: &Files) -> String {
    let mut v: Vec<String> = f
        .iter()
        .map(|(k, c)| {
            if c.len() <= 8 {
                format!("{k}={}", String::from_utf8_lossy(c))
            } else {
                format!("{k}[{}B]", c.len())
            }
        })
        .collect();
    v.sort();
    format!("{{{}}}", v.join(" "))
}

fn check_after_restart(p: &mut Plugin, model: &Model, res: &mut RunResult) {
    let root = p.root.clone();
    let has_cache = check_layers(&root, model, res);
    let allowed = model.allowed();
    let explain = |got: &Files| {
        format!(
            "INVARIANT snapshot-atomic: the latest snapshot shows {} which is neither the acknowledged version {} nor one that finishing the interrupted commits could give ({} allowed)",
            describe(got),
            describe(&model.latest),
            allowed.len()
        )
    };
    if has_cache {
        // The worker may collect a layer of a state read a moment ago: retry as check_layers does.
        let mut view = common::SnapshotView::latest(&root, CACHE);
        for _ in 0..3 {
            match &view {
                Err(e) if e.contains("layer-exists") => {
                    std::thread::sleep(Duration::from_millis(100));
                    view = common::SnapshotView::latest(&root, CACHE);
                }
                _ => break,
            }
        }
        match view {
            Ok(v) => match common::read_tree(&v.path) {
                Ok(t) => {
                    let got = common::files_of(&t);
                    if !allowed.contains(&got) {
                        res.failures.push(format!(
                            "{} [kernel overlay of the state's chain]",
                            explain(&got)
                        ));
                    }
                }
                Err(e) => res.failures.push(format!(
                    "INVARIANT snapshot-atomic: reading the latest snapshot: {e}"
                )),
            },
            Err(e) => res.failures.push(format!(
                "INVARIANT snapshot-atomic: the latest snapshot does not mount: {e}"
            )),
        }
    }
    // The same snapshot through the backend under test, as a new container would see it.
    let check = json!({"Name": "fp-check", "Opts": {"commit": "discard"}});
    let r = p.ok("/VolumeDriver.Create", check).and_then(|_| {
        p.ok(
            "/VolumeDriver.Mount",
            json!({"Name": "fp-check", "ID": "chk"}),
        )
    });
    match r {
        Ok(v) => {
            let mp = PathBuf::from(v["Mountpoint"].as_str().unwrap_or_default());
            match common::read_tree(&mp) {
                Ok(t) => {
                    let got = common::files_of(&t);
                    if !allowed.contains(&got) {
                        res.failures.push(format!("{} [new {} session]", explain(&got), p.backend));
                    }
                }
                Err(e) => res.failures.push(format!(
                    "INVARIANT snapshot-atomic: reading a new session's view: {e}"
                )),
            }
            for (ep, b) in [
                ("/VolumeDriver.Unmount", json!({"Name": "fp-check", "ID": "chk"})),
                ("/VolumeDriver.Remove", json!({"Name": "fp-check"})),
            ] {
                if let Err(e) = p.ok(ep, b) {
                    res.failures.push(format!("INVARIANT docker-ops: check volume: {e}"));
                }
            }
        }
        Err(e) => res.failures.push(format!(
            "INVARIANT docker-ops: a new volume of the cache cannot be created and mounted after restart: {e}"
        )),
    }
    // Docker's next calls for every volume succeed.
    let listed: Vec<String> = match p.ok("/VolumeDriver.List", json!({})) {
        Ok(v) => v["Volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x["Name"].as_str().map(str::to_string))
            .collect(),
        Err(e) => {
            res.failures
                .push(format!("INVARIANT docker-ops: List after restart: {e}"));
            vec![]
        }
    };
    for vol in &model.created {
        if !listed.iter().any(|l| l == vol) {
            continue; // Create or Remove may legitimately not have happened / already happened.
        }
        let was_mounted = model.pending.iter().any(|s| s.vol == *vol);
        let ctx = if was_mounted {
            " (its session was cut short by the failpoint: an orphan, issue 12 items 1-2)"
        } else {
            ""
        };
        let steps = [
            ("/VolumeDriver.Get", json!({"Name": vol})),
            ("/VolumeDriver.Mount", json!({"Name": vol, "ID": "after"})),
            ("/VolumeDriver.Unmount", json!({"Name": vol, "ID": "after"})),
            ("/VolumeDriver.Remove", json!({"Name": vol})),
        ];
        for (ep, b) in steps {
            if let Err(e) = p.ok(ep, b) {
                if *vol == IDLE_VOLUME && e.contains("no such volume") {
                    break; // dropped as idle by the worker after the List (--max-idle)
                }
                res.failures
                    .push(format!("INVARIANT docker-ops: volume {vol}{ctx}: {e}"));
                break;
            }
        }
    }
    match p.ok("/VolumeDriver.List", json!({})) {
        Ok(v) if v["Volumes"].as_array().is_some_and(|a| a.is_empty()) => {}
        Ok(v) => res.failures.push(format!(
            "INVARIANT docker-ops: volumes remain after Remove of every volume: {v}"
        )),
        Err(e) => res
            .failures
            .push(format!("INVARIANT docker-ops: List: {e}")),
    }
    // Sessions that recovery committed while we worked must have left complete layers too.
    check_layers(&root, model, res);
    if let Err(e) = p.stop() {
        res.failures.push(format!("INVARIANT clean-shutdown: {e}"));
    }
    // FUSE servers exit shortly after their unmount.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !common::processes_under(&root).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = common::mounts_under(&root);
    if !m.is_empty() {
        res.failures.push(format!(
            "INVARIANT clean-shutdown: mounts left under the root after every volume was removed: {m:?}"
        ));
    }
    let procs = common::processes_under(&root);
    if !procs.is_empty() {
        res.failures.push(format!(
            "INVARIANT clean-shutdown: FUSE servers left running: {procs:?}"
        ));
    }
    let t = common::temp_files_under(&root);
    if !t.is_empty() {
        res.failures.push(format!(
            "INVARIANT clean-shutdown: temp files left under the root (recovery should remove them): {t:?}"
        ));
    }
}

/// `n` hit indices spread over `0..total`, always including the first and the last.
fn sample(total: usize, n: usize) -> Vec<usize> {
    if total <= n {
        return (0..total).collect();
    }
    let mut v: Vec<usize> = (0..n).map(|i| i * (total - 1) / (n - 1).max(1)).collect();
    v.dedup();
    v
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs every (failpoint, target) of `plan` on `jobs` threads, each on its own root; results in
/// plan order.
fn run_all(env: &Env, plan: &[(String, Target)], jobs: usize) -> Vec<RunResult> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, RunResult)>> = Mutex::new(vec![]);
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((fp, t)) = plan.get(i) else { break };
                let r = run_one(env, fp, t);
                eprintln!(
                    "crash[{}] {fp} {}: {}{}",
                    env.backend,
                    t.label(),
                    if r.fired { "fired" } else { "not fired" },
                    if r.failures.is_empty() {
                        ", invariants hold"
                    } else {
                        ", INVARIANTS BROKEN"
                    }
                );
                results.lock().expect("results").push((i, r));
            });
        }
    });
    let mut results = results.into_inner().expect("results");
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

fn drive(backend: &'static str) {
    let test = format!("crash::failpoints_{backend}");
    if !common::backends(&test).contains(&backend) {
        return;
    }
    let t0 = Instant::now();
    let mut fps = discover_failpoints();
    assert!(
        !fps.is_empty(),
        "no failpoint!(\"...\") found under src/: the scan is broken"
    );
    // Push/pull steps need a registry: tests/remote.rs drives them (error and kill -9).
    fps.retain(|f| !f.starts_with("remote::"));
    if let Ok(only) = std::env::var("CACHEDRIVER_CRASH_ONLY") {
        let only: Vec<&str> = only.split(',').collect();
        fps.retain(|f| only.contains(&f.as_str()));
    }
    let mut extra = vec![];
    if common::serve_has_flag("--compact-depth") {
        extra = vec!["--compact-depth".to_string(), "2".to_string()];
    } else {
        eprintln!("crash: `serve --compact-depth` does not exist yet: background compaction is not driven");
    }
    // The sweep every second (it ends the released fp-s1), and idle volume records dropped
    // (the planted old record of fp-i1; every other record is fresh).
    for (flag, v) in [("--sweep-interval", "1"), ("--max-idle", "1h")] {
        assert!(
            common::serve_has_flag(flag),
            "`serve {flag}` is missing: the scenario needs it"
        );
        extra.extend([flag.to_string(), v.to_string()]);
    }
    let subs = common::subcommands();
    let maint_cmds: Vec<String> = ["gc", "compact"]
        .iter()
        .filter(|c| subs.iter().any(|s| s == *c))
        .map(|s| s.to_string())
        .collect();
    let env = Env {
        backend,
        extra,
        maint_cmds,
    };
    let per = env_usize("CACHEDRIVER_CRASH_HITS", 6);
    let jobs = env_usize("CACHEDRIVER_CRASH_JOBS", 3).max(1);

    // Pass 1: how often the scenario hits each failpoint.
    let mut plan: Vec<(String, Target)> = vec![];
    let mut failures: Vec<String> = vec![];
    let mut hits_table = vec![];
    let counts: Vec<(String, Target)> = fps.iter().map(|f| (f.clone(), Target::Count)).collect();
    for (fp, r) in fps.iter().zip(run_all(&env, &counts, jobs)) {
        for f in &r.failures {
            failures.push(format!(
                "[{backend}] {fp} (no injection, counting pass): {f}"
            ));
        }
        hits_table.push(format!(
            "{fp}: serve hits (phase 1, phase 2) {:?}, commands {:?}",
            r.serve_hits, r.cli_hits
        ));
        if r.serve_hits == [0, 0] && r.cli_hits.values().all(|h| *h == 0) {
            failures.push(format!(
                "[{backend}] failpoint {fp} is never reached by the scenario: extend the scenario in tests/crash.rs so it runs that step"
            ));
        }
        for crash in [false, true] {
            for phase in [1, 2] {
                for k in sample(r.serve_hits[phase - 1], per) {
                    plan.push((fp.clone(), Target::Serve { phase, k, crash }));
                }
            }
            for (cmd, h) in &r.cli_hits {
                for k in sample(*h, per.min(2)) {
                    plan.push((
                        fp.clone(),
                        Target::Cli {
                            cmd: cmd.clone(),
                            k,
                            crash,
                        },
                    ));
                }
            }
        }
    }
    // Pass 2: inject, in parallel on separate roots.
    let results: Vec<(usize, RunResult)> =
        run_all(&env, &plan, jobs).into_iter().enumerate().collect();
    let mut summary: BTreeMap<(String, bool), (usize, usize, usize)> = BTreeMap::new();
    let mut logs_shown = 0;
    for (i, r) in &results {
        let (fp, t) = &plan[*i];
        let e = summary.entry((fp.clone(), t.crash())).or_default();
        e.0 += 1;
        if r.fired {
            e.1 += 1;
        }
        if !r.failures.is_empty() {
            e.2 += 1;
            for f in &r.failures {
                // Logs of the first few broken runs are enough to debug; the rest only bloat CI.
                if f.starts_with("plugin logs") {
                    logs_shown += 1;
                    if logs_shown > 4 {
                        continue;
                    }
                }
                failures.push(format!("[{backend}] {fp} {}: {f}", t.label()));
            }
        }
    }
    eprintln!("\ncrash[{backend}] failpoints found: {}", fps.join(", "));
    for h in &hits_table {
        eprintln!("crash[{backend}]   {h}");
    }
    for ((fp, crash), (runs, fired, broken)) in &summary {
        let mode = if *crash { "crash" } else { "error" };
        eprintln!(
            "crash[{backend}] {fp:<40} {mode}: {runs} run(s), fired in {fired}, invariants broken in {broken} => {}",
            if *broken == 0 && *fired > 0 { "PASS" } else { "FAIL" }
        );
        if *fired == 0 {
            failures.push(format!(
                "[{backend}] failpoint {fp} never fired in {mode} mode although the counting pass reached it"
            ));
        }
    }
    eprintln!(
        "crash[{backend}] {} run(s) in {:.1} s",
        results.len() + fps.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} failure(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn failpoints_kernel() {
    drive("kernel");
}

#[test]
fn failpoints_fuse() {
    drive("fuse");
}

#[test]
fn discovery_finds_the_commit_failpoints() {
    let fps = discover_failpoints();
    for want in ["commit::before_rename", "commit::before_state"] {
        assert!(fps.iter().any(|f| f == want), "{want} not found in {fps:?}");
    }
}
