//! Compaction: flattening the bottom of a cache's latest chain into one layer (DESIGN §6).
//!
//! When the latest chain is deeper than `max_depth`, the top `max_depth / 2` layers (at least
//! one) are kept as they are and every layer below them is flattened into one new bottom layer
//! ([`flatten`]: hard links, no file data copied). The chain is then `max_depth / 2 + 1` deep, so
//! the next compaction comes after about `max_depth / 2` more commits: a flattening costs about
//! one walk of the cache, paid once per `max_depth / 2` commits. `force` (the `compact` command)
//! keeps only the top layer and flattens the rest whenever the chain is deeper than one.
//! The latest layer always keeps its name (the seed's tools read `state.latest`).
//!
//! Locking and crash safety:
//! 1. the cache's maintenance lock ([`Store::lock_maintenance`]) is held throughout, so two
//!    compactions or GCs of one cache never overlap; leftover `.tmp-compact-*` dirs of an
//!    earlier crash are removed under it;
//! 2. the cache lock is taken briefly to read the state, and released;
//! 3. the range is flattened into `lower/<cache>/.tmp-compact-<name>` and `syncfs`ed, without
//!    the cache lock (Mount and Unmount of the cache go on meanwhile);
//! 4. under the cache lock again: the state is re-read; if the layer above the range no longer
//!    sits on it, the new layer is removed and nothing changes (`Ok(None)`); else the temp dir
//!    is renamed to a fresh layer name (`c.<unix time>`), the cache dir fsynced, and the state
//!    written atomically with the layer above the range now on the new layer (whose record has
//!    no parent and `compacted_from`).
//!
//! The old layers are never deleted here: sessions mounted on the old chain keep their explicit
//! `lowers`, and GC deletes the old layers once nothing lists them. A crash leaves at most a
//! `.tmp-compact-*` dir (removed by the next compaction) or, between rename and state write, a
//! complete layer dir that no state names (for GC).

mod flatten;

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{fsync_dir, remove_tree};
use crate::store::Store;

/// Default bound on the depth of a latest chain before it is compacted.
pub const DEFAULT_DEPTH: usize = 16;

/// Prefix of a flattening's temporary dir in `lower/<cache>/`.
const TMP_PREFIX: &str = ".tmp-compact-";

/// What one compaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    /// The cache compacted.
    pub cache: String,
    /// The layers flattened (bottom-up); GC deletes them once nothing needs them.
    pub flattened: Vec<String>,
    /// The new layer that replaces them in the latest chain.
    pub new_layer: String,
    /// Entries linked or created in the new layer.
    pub entries: u64,
    /// Depth of the latest chain before and after.
    pub depth_before: usize,
    /// Depth of the latest chain after.
    pub depth_after: usize,
    /// Entries copied rather than linked (their inode had the filesystem's maximum of links).
    pub copied: u64,
    /// Time spent, locks and flattening included.
    pub elapsed: Duration,
}

/// How many layers at the top of a chain of `depth` stay as they are, or `None` when there is
/// nothing to compact.
pub fn layers_to_keep(depth: usize, max_depth: usize, force: bool) -> Option<usize> {
    if force {
        return (depth > 1).then_some(1);
    }
    let max_depth = max_depth.max(1);
    (depth > max_depth).then(|| (max_depth / 2).max(1))
}

/// Removes `.tmp-compact-*` dirs left by an interrupted compaction. Caller holds the
/// maintenance lock.
fn remove_leftovers(store: &Store, cache: &str) -> Result<()> {
    let dir = store.cache_dir(cache);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("listing cache dir", dir, e)),
    };
    let mut removed = false;
    for e in rd.flatten() {
        if e.file_name()
            .as_encoded_bytes()
            .starts_with(TMP_PREFIX.as_bytes())
        {
            tracing::info!(cache, dir = %e.path().display(), "removing a leftover of an interrupted compaction");
            remove_tree(&e.path())?;
            removed = true;
        }
    }
    if removed {
        fsync_dir(&dir)?;
    }
    Ok(())
}

/// Compacts `cache` if its latest chain is deeper than `max_depth` (or unconditionally when
/// `force`); `Ok(None)` when there was nothing to do. Takes the cache's locks itself, holding the
/// cache lock only to read and to switch the state, never while flattening.
pub fn compact_cache(
    store: &Store,
    cache: &str,
    max_depth: usize,
    force: bool,
) -> Result<Option<CompactReport>> {
    crate::names::validate_cache(cache)?;
    let start = Instant::now();
    if !store.cache_dir(cache).is_dir() {
        // Never used (or removed): nothing to compact, and no empty cache dir made by locking.
        return Ok(None);
    }
    let _maint = store.lock_maintenance(cache)?;
    remove_leftovers(store, cache)?;

    let state = {
        let _lock = store.lock_cache(cache)?;
        store.load_state(cache)?
    };
    let Some(state) = state else {
        return Ok(None);
    };
    // Every scope's chain is bounded: compact the deepest (scopes sharing the layers above the
    // flattened range all get the new layer under them).
    let mut chain = state.latest_chain()?;
    for root in state.roots() {
        let c = state.chain(root)?;
        if c.len() > chain.len() {
            chain = c;
        }
    }
    let root = chain[0].clone();
    let depth_before = chain.len();
    let Some(keep) = layers_to_keep(depth_before, max_depth, force) else {
        return Ok(None);
    };
    let above = chain[keep - 1].clone();
    let range: Vec<String> = chain[keep..].to_vec();

    // The temp name is fresh per run; the final name is chosen under the cache lock.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base_name = format!("c.{stamp}");
    let tmp = store
        .cache_dir(cache)
        .join(format!("{TMP_PREFIX}{base_name}-{}", std::process::id()));
    let layers: Vec<(String, PathBuf)> = range
        .iter()
        .map(|l| (l.clone(), store.layer_dir(cache, l)))
        .collect();
    tracing::info!(
        cache,
        depth = depth_before,
        flatten = range.len(),
        kept = keep,
        "compacting"
    );

    // Dirs and xattrs take space: on any failure (ENOSPC included) the partial layer goes and
    // the old chain stays.
    let stats = match build(&tmp, &layers) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(cache, error = %e, "compaction failed; the chain stays as it was");
            if let Err(e2) = remove_tree(&tmp) {
                tracing::warn!(error = %e2, dir = %tmp.display(), "could not remove a partial compacted layer");
            }
            return Err(e);
        }
    };

    let switched = switch(store, cache, &tmp, &above, &range, &base_name, &root);
    let outcome = match switched {
        Ok(Some(x)) => x,
        Ok(None) => {
            remove_tree(&tmp)?;
            return Ok(None);
        }
        Err(e) => {
            if let Err(e2) = remove_tree(&tmp) {
                tracing::warn!(error = %e2, dir = %tmp.display(), "could not remove an unused compacted layer");
            }
            return Err(e);
        }
    };
    let (new_layer, depth_after) = outcome;
    let mut flattened = range;
    flattened.reverse();
    let report = CompactReport {
        cache: cache.to_string(),
        flattened,
        new_layer,
        entries: stats.entries,
        depth_before,
        depth_after,
        copied: stats.copied,
        elapsed: start.elapsed(),
    };
    tracing::info!(cache, new_layer = %report.new_layer, layers = report.flattened.len(),
        entries = report.entries, copied = report.copied, depth_before, depth_after,
        ms = report.elapsed.as_millis() as u64, "compacted");
    Ok(Some(report))
}

/// Under the cache lock: checks that `above` still sits on `range`, renames `tmp` to a fresh
/// layer name and writes the state with `above` on the new layer. `Ok(None)` when the chain
/// moved (or the cache went) meanwhile; `tmp` is then still there for the caller to remove.
fn switch(
    store: &Store,
    cache: &str,
    tmp: &std::path::Path,
    above: &str,
    range: &[String],
    base_name: &str,
    root: &str,
) -> Result<Option<(String, usize)>> {
    let _lock = store.lock_cache(cache)?;
    let Some(mut st) = store.load_state(cache)? else {
        tracing::info!(cache, "the cache was removed during compaction");
        return Ok(None);
    };
    let still_on_range = st
        .layers
        .get(above)
        .is_some_and(|l| l.parent.as_deref() == Some(range[0].as_str()))
        && st.chain(&range[0]).ok().as_deref() == Some(range);
    if !still_on_range {
        tracing::info!(
            cache,
            above,
            "the chain changed during compaction; dropping the new layer"
        );
        return Ok(None);
    }
    // A commit a crash cut short names its layer only in its volume record until recovery
    // settles it; flattening that layer away first would make recovery commit it a second time.
    if let Some(v) = unsettled_commit(store, cache, range)? {
        tracing::info!(
            cache,
            volume = %v,
            "a commit cut short by a crash is not settled yet; compaction waits for recovery"
        );
        return Ok(None);
    }
    let name = st.unique_layer_name(base_name, |n| store.layer_dir(cache, n).exists());
    let dest = store.layer_dir(cache, &name);
    fs::rename(tmp, &dest).ctx("renaming compacted layer into place", &dest)?;
    fsync_dir(&store.cache_dir(cache))?;
    if let Err(e) = record(store, cache, &mut st, &name, range, above) {
        // Nothing names the new layer: put it back under its temp name for the caller to remove.
        if let Err(e2) = fs::rename(&dest, tmp) {
            tracing::warn!(error = %e2, dir = %dest.display(), "could not move an unused compacted layer aside");
        }
        return Err(e);
    }
    crate::failpoint!("compact::after_state");
    let depth_after = st.chain(root).map(|c| c.len()).unwrap_or(0);
    Ok(Some((name, depth_after)))
}

/// The volume of `cache` whose session is still `committing` one of `range` (a commit whose
/// record a crash left for recovery to settle), if any.
fn unsettled_commit(store: &Store, cache: &str, range: &[String]) -> Result<Option<String>> {
    Ok(store.list_volumes()?.into_iter().find_map(|v| {
        let s = v.session.as_ref()?;
        let layer = s.committing.as_ref()?;
        (v.cache == cache && range.contains(layer)).then(|| v.name.clone())
    }))
}

/// Records the new layer in the state and writes it.
fn record(
    store: &Store,
    cache: &str,
    st: &mut crate::state::CacheState,
    name: &str,
    range: &[String],
    above: &str,
) -> Result<()> {
    crate::failpoint!("compact::after_rename");
    let bottom_up: Vec<String> = range.iter().rev().cloned().collect();
    st.record_compacted(name, &bottom_up, above);
    crate::failpoint!("compact::before_state");
    store.save_state(cache, st)
}

/// Flattens `layers` into a fresh `tmp` and makes it durable.
fn build(tmp: &std::path::Path, layers: &[(String, PathBuf)]) -> Result<flatten::Stats> {
    remove_tree(tmp)?;
    fs::create_dir(tmp).ctx("creating compaction dir", tmp)?;
    // One fd per level for the new layer and one per level per contributing layer: room for
    // deep trees (a few thousand levels) over the whole range, as far as the hard limit allows.
    let _ = cachedriver_common::rlimit::raise_nofile();
    let stats = flatten::flatten(layers, tmp)?;
    crate::failpoint!("compact::after_flatten");
    crate::fsutil::syncfs(tmp)?;
    crate::failpoint!("compact::after_syncfs");
    Ok(stats)
}

#[cfg(test)]
mod tests;
