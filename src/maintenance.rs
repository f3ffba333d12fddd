//! The background maintenance worker of `serve`: compaction, GC and the disk budget, off the
//! request path.
//!
//! One plain thread (never on the async runtime: all of it is blocking filesystem work). The
//! driver tells it about each commit through a channel without waiting ([`after_commit`]); it
//! also runs every [`Settings::interval`] over all caches. A pass over a set of caches
//! ([`run_once`]) does, per cache, `compact_cache` (when the latest chain is deeper than
//! `--compact-depth`) then GC; then the budget over all caches; on periodic passes with
//! `--max-idle` it also drops idle volume records. Errors are logged and never stop the worker
//! or the other caches.
//!
//! Volume records: `volumes/` would otherwise grow by one file per volume name ever used. With
//! `--max-idle`, a record with no live session whose file was not written for that long (every
//! Mount and Unmount rewrites it) is dropped; Docker forgets a volume whose Get says unknown and
//! creates it again on its next use, so nothing is lost but the record.

use std::collections::BTreeSet;
use std::fs;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::budget::{self, Eviction, Policy, UsageMemo};
use crate::commit::Outcome;
use crate::compact::{compact_cache, CompactReport};
use crate::error::Result;
use crate::gc::{gc_cache, gc_store_leftovers, GcReport};
use crate::store::Store;

/// How often the worker passes over every cache without being told of a commit.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(600);

/// How long the worker waits after a commit for more commits before it starts a pass.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// What the worker does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `--compact-depth`: compact a latest chain deeper than this.
    pub compact_depth: usize,
    /// `--max-size` / `--max-idle`.
    pub policy: Policy,
    /// Period of the full passes.
    pub interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            compact_depth: crate::compact::DEFAULT_DEPTH,
            policy: Policy::default(),
            interval: DEFAULT_INTERVAL,
        }
    }
}

enum Msg {
    Committed(String),
    Stop,
}

/// The driver's handle on the worker: [`Notifier::committed`] never blocks.
#[derive(Debug, Clone)]
pub struct Notifier(mpsc::Sender<Msg>);

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Committed(c) => write!(f, "Committed({c})"),
            Msg::Stop => f.write_str("Stop"),
        }
    }
}

impl Notifier {
    /// Tells the worker `cache` got a commit.
    pub fn committed(&self, cache: &str) {
        let _ = self.0.send(Msg::Committed(cache.to_string()));
    }
}

/// The driver's hook after a commit: records the cache's last use and wakes the worker.
pub fn after_commit(store: &Store, cache: &str, outcome: &Outcome, notifier: Option<&Notifier>) {
    if let Outcome::Committed { .. } = outcome {
        budget::mark_used(store, cache);
        if let Some(n) = notifier {
            n.committed(cache);
        }
    }
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct PassReport {
    /// Compactions done.
    pub compacted: Vec<CompactReport>,
    /// GC per cache.
    pub gc: Vec<GcReport>,
    /// Caches evicted by the budget.
    pub evicted: Vec<Eviction>,
    /// Volume records dropped as idle.
    pub volumes_dropped: Vec<String>,
    /// Errors, one line each (also logged).
    pub errors: Vec<String>,
}

/// One maintenance pass as the server runs it: compaction and GC of `caches` (all when `None`),
/// then the budget over all caches. Errors are collected and logged, never returned.
pub fn run_once(
    store: &Store,
    settings: &Settings,
    caches: Option<&[String]>,
    memo: &mut UsageMemo,
) -> PassReport {
    let mut r = PassReport::default();
    let err = |r: &mut PassReport, what: String| {
        tracing::warn!("maintenance: {what}");
        r.errors.push(what);
    };
    let all;
    let caches = match caches {
        Some(c) => c,
        None => match store.list_caches() {
            Ok(c) => {
                all = c;
                &all
            }
            Err(e) => {
                err(&mut r, format!("listing caches: {e}"));
                return r;
            }
        },
    };
    for c in caches {
        match compact_cache(store, c, settings.compact_depth, false) {
            Ok(Some(rep)) => {
                tracing::info!(cache = %c, depth_before = rep.depth_before, depth_after = rep.depth_after,
                    new_layer = %rep.new_layer, "compacted");
                crate::metrics::compacted(c);
                r.compacted.push(rep);
            }
            Ok(None) => {}
            Err(e) => err(&mut r, format!("compacting cache {c}: {e}")),
        }
        match gc_cache(store, c, false) {
            Ok(g) => {
                crate::metrics::gc_freed(g.deleted.len() as u64, g.bytes_freed);
                r.gc.push(g)
            }
            Err(e) => err(&mut r, format!("gc of cache {c}: {e}")),
        }
        // What `cachedriver_layers` / `cachedriver_bytes` report (layers are immutable, so the
        // memo makes this a walk of new layers only).
        let layers = store
            .load_state(c)
            .ok()
            .flatten()
            .map_or(0, |s| s.layers.len() as u64);
        crate::metrics::cache_size(c, layers, budget::cache_usage(store, c, memo));
    }
    if let Err(e) = gc_store_leftovers(store, false) {
        err(&mut r, format!("removing dropped caches: {e}"));
    }
    match budget::enforce(store, &settings.policy, memo) {
        Ok(ev) => {
            for e in &ev {
                let reason = if e.why.contains("idle") {
                    "max-idle"
                } else {
                    "max-size"
                };
                crate::metrics::evicted(&e.cache, reason);
            }
            r.evicted = ev
        }
        Err(e) => err(&mut r, format!("disk budget: {e}")),
    }
    r
}

/// Drops volume records with no live session not written for `idle` (see the module doc).
pub fn prune_idle_volumes(store: &Store, idle: Duration) -> Result<Vec<String>> {
    let now = SystemTime::now();
    let old = |name: &str| {
        let p = store.root().join("volumes").join(format!("{name}.json"));
        fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .map(|t| now.duration_since(t).unwrap_or_default() > idle)
            .unwrap_or(false)
    };
    let mut out = Vec::new();
    for v in store.list_volumes()? {
        if v.session.is_some() || !old(&v.name) {
            continue;
        }
        let _lock = store.lock_cache(&v.cache)?;
        // Re-read under the lock: a Mount may have started a session meanwhile.
        match store.load_volume(&v.name)? {
            Some(cur) if cur.session.is_none() && old(&v.name) => {
                crate::failpoint!("maintenance::before_drop_volume");
                store.delete_volume(&v.name)?;
                tracing::info!(volume = %v.name, cache = %v.cache, "dropped idle volume record (--max-idle)");
                out.push(v.name);
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The running worker thread.
#[derive(Debug)]
pub struct Worker {
    tx: Notifier,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the worker over `store`; its first pass runs at once over all caches.
    pub fn start(store: Store, settings: Settings) -> Result<Worker> {
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("maintenance".into())
            .spawn(move || worker(store, settings, rx))
            .map_err(|e| crate::error::Error::io("starting the maintenance thread", "", e))?;
        Ok(Worker {
            tx: Notifier(tx),
            handle: Some(handle),
        })
    }

    /// A handle for the driver.
    pub fn notifier(&self) -> Notifier {
        self.tx.clone()
    }

    /// Stops the worker after its current step and waits for it.
    pub fn stop(mut self) {
        let _ = self.tx.0.send(Msg::Stop);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn worker(store: Store, settings: Settings, rx: mpsc::Receiver<Msg>) {
    tracing::info!(compact_depth = settings.compact_depth, max_size = ?settings.policy.max_size,
        max_idle = ?settings.policy.max_idle, interval_s = settings.interval.as_secs(), "maintenance worker started");
    let mut memo = UsageMemo::default();
    let mut next_full = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_full {
            run_once(&store, &settings, None, &mut memo);
            if let Some(idle) = settings.policy.max_idle {
                if let Err(e) = prune_idle_volumes(&store, idle) {
                    tracing::warn!(error = %e, "maintenance: pruning idle volume records");
                }
            }
            next_full = Instant::now() + settings.interval;
            continue;
        }
        let mut touched = BTreeSet::new();
        match rx.recv_timeout(next_full - now) {
            Ok(Msg::Committed(c)) => {
                touched.insert(c);
            }
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => continue,
        }
        // Commits come in bursts (a CI wave ending): one pass for the burst.
        let until = Instant::now() + DEBOUNCE;
        let mut stop = false;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(Msg::Committed(c)) => {
                    touched.insert(c);
                }
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                    stop = true;
                    break;
                }
                Err(RecvTimeoutError::Timeout) => break,
            }
        }
        let caches: Vec<String> = touched.into_iter().collect();
        run_once(&store, &settings, Some(&caches), &mut memo);
        if stop {
            break;
        }
    }
    tracing::info!("maintenance worker stopped");
}
