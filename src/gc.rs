//! Garbage collection (DESIGN §6): deleting the layers that no root of a cache's state and no
//! live session needs, and pruning `cache-state.json` to what is reachable.
//!
//! Per cache, under its maintenance lock (so it never overlaps a compaction) and, for the
//! decision and the state write, its cache lock (so no Mount or commit changes the records
//! meanwhile):
//! 1. reachable = the chains of every root the state names ∪ every layer a live session of the
//!    cache mounts (`lowers`, `base`) ∪ every layer name a session's `committing` names (a
//!    promotion cut short by a crash, which recovery adopts); a dir named after a live session's
//!    id (`id` or `id.N`, its commit target) is never deleted either;
//! 2. `layers` in the state is pruned to reachable entries (atomic write);
//! 3. every dir in `lower/<cache>/` with a valid layer name that is not reachable, and every
//!    `.tmp-*` left by a crashed compaction, is renamed to `.gc-*` (then the dir is fsynced);
//!
//! then, with only the maintenance lock held (Mounts no longer wait), every `.gc-*` dir is
//! measured and deleted. A crash between renaming and deleting leaves `.gc-*` dirs that the next
//! GC deletes. `dry_run` computes the same report and changes nothing.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use crate::budget::{aside_name, freed_bytes, volumes_strict};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{fsync_dir, remove_tree};
use crate::names::is_valid_layer;
use crate::state::CacheState;
use crate::store::{Session, Store, STATE_FILE};

/// What one GC of one cache did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// The cache.
    pub cache: String,
    /// Unreachable layers deleted.
    pub deleted: Vec<String>,
    /// Leftovers of crashed operations deleted (`.gc-*`, `.tmp-*`, stale state temp files).
    pub leftovers: Vec<String>,
    /// Entries dropped from `cache-state.json`'s `layers`.
    pub pruned: Vec<String>,
    /// Layers kept only because a live session mounts them (or is promoting to them).
    pub kept_for_sessions: Vec<String>,
    /// Disk freed, each inode once, counting a file only if none of its links is kept.
    pub bytes_freed: u64,
    /// Nothing was changed.
    pub dry_run: bool,
}

/// Every layer of `state`'s roots' chains plus every layer the given sessions need.
pub fn reachable<'a>(
    state: &CacheState,
    sessions: impl IntoIterator<Item = &'a Session>,
) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for root in state.roots() {
        let mut cur = Some(root);
        // Stops where it joins a chain already walked; a loop (corrupt state) ends there too.
        while let Some(l) = cur {
            if !set.insert(l.to_string()) {
                break;
            }
            cur = state.layers.get(l).and_then(|i| i.parent.as_deref());
        }
    }
    for s in sessions {
        set.extend(s.lowers.iter().cloned());
        set.insert(s.base.clone());
        set.extend(s.committing.iter().cloned());
    }
    set
}

/// Collects garbage in one cache (see the module doc).
pub fn gc_cache(store: &Store, cache: &str, dry_run: bool) -> Result<GcReport> {
    crate::names::validate_cache(cache)?;
    let dir = store.cache_dir(cache);
    let mut report = GcReport {
        cache: cache.to_string(),
        dry_run,
        ..GcReport::default()
    };
    let _m = store.lock_maintenance(cache)?;
    let doomed: Vec<PathBuf> = {
        let _c = store.lock_cache(cache)?;
        let state = store.load_state(cache)?;
        let live: Vec<_> = volumes_strict(store)?
            .into_iter()
            .filter(|v| v.cache == cache && v.session.is_some())
            .collect();
        let sessions: Vec<Session> = live.iter().filter_map(|v| v.session.clone()).collect();
        // A live session's commit target is named after its id (`id`, `id.N`): a promotion cut
        // short before `committing` was recorded must not lose its layer either.
        let commit_target = |name: &str| {
            live.iter().any(|v| {
                name == v.id
                    || name.strip_prefix(v.id.as_str()).is_some_and(|rest| {
                        rest.strip_prefix('.')
                            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    })
            })
        };
        let mut reach = BTreeSet::new();
        if let Some(state) = &state {
            reach = reachable(state, &[]);
            let all = reachable(state, &sessions);
            report.kept_for_sessions = all.difference(&reach).cloned().collect();
            reach = all;
            report.pruned = state
                .layers
                .keys()
                .filter(|k| !reach.contains(*k))
                .cloned()
                .collect();
        } else {
            // No state (a cache being created, or a broken one): delete no layer, only leftovers.
            for s in &sessions {
                reach.extend(s.lowers.iter().cloned());
                reach.extend(s.committing.iter().cloned());
            }
        }
        let state_tmp = format!(".{STATE_FILE}.tmp-");
        let mut victims = Vec::new();
        for e in fs::read_dir(&dir).ctx("listing cache", &dir)? {
            let e = e.ctx("listing cache", &dir)?;
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let is_dir = e.file_type().ctx("inspecting", &e.path())?.is_dir();
            if is_dir && is_valid_layer(&name) {
                if state.is_some() && !reach.contains(&name) && !commit_target(&name) {
                    report.deleted.push(name.clone());
                    victims.push(name);
                }
            } else if (is_dir && (name.starts_with(".gc-") || name.starts_with(".tmp-")))
                || (!is_dir && name.starts_with(&state_tmp))
            {
                report.leftovers.push(name.clone());
                victims.push(name);
            }
        }
        report.deleted.sort();
        report.leftovers.sort();
        if dry_run {
            // Measured below, after the cache lock is released: the maintenance lock we still
            // hold keeps every one of these dirs in place.
            victims.iter().map(|n| dir.join(n)).collect()
        } else {
            if let Some(mut state) = state {
                if !report.pruned.is_empty() {
                    crate::failpoint!("gc::before_prune_state");
                    state.layers.retain(|k, _| reach.contains(k));
                    store.save_state(cache, &state)?;
                }
            }
            crate::failpoint!("gc::before_rename");
            let mut doomed = Vec::new();
            for n in &victims {
                let from = dir.join(n);
                if n.starts_with(".gc-") {
                    doomed.push(from);
                    continue;
                }
                let to = aside_name(&dir, n.trim_start_matches('.'));
                fs::rename(&from, &to).ctx("moving garbage aside", &from)?;
                doomed.push(to);
            }
            if !doomed.is_empty() {
                fsync_dir(&dir)?;
            }
            doomed
        }
    };
    if dry_run {
        report.bytes_freed = freed_bytes(&doomed);
        return Ok(report);
    }
    crate::failpoint!("gc::before_delete");
    report.bytes_freed = freed_bytes(&doomed);
    for p in &doomed {
        remove_tree(p)?;
    }
    if !report.deleted.is_empty() || !report.leftovers.is_empty() {
        tracing::info!(
            cache,
            deleted = report.deleted.len(),
            leftovers = report.leftovers.len(),
            pruned = report.pruned.len(),
            bytes_freed = report.bytes_freed,
            "gc"
        );
    }
    Ok(report)
}

/// Deletes `lower/.gc-*`: caches dropped by `rm` or eviction whose deletion a crash cut short.
/// Returns the names deleted (or, with `dry_run`, that would be) and the bytes freed.
pub fn gc_store_leftovers(store: &Store, dry_run: bool) -> Result<(Vec<String>, u64)> {
    let lower = store.root().join("lower");
    let mut names = Vec::new();
    for e in fs::read_dir(&lower)
        .ctx("listing caches", &lower)?
        .flatten()
    {
        if let Ok(n) = e.file_name().into_string() {
            if n.starts_with(".gc-") {
                names.push(n);
            }
        }
    }
    names.sort();
    let paths: Vec<PathBuf> = names.iter().map(|n| lower.join(n)).collect();
    let bytes = freed_bytes(&paths);
    if !dry_run {
        for p in &paths {
            remove_tree(p)?;
        }
    }
    Ok((names, bytes))
}

/// Refuses a cache name that is not a cache of this store.
pub fn check_cache_exists(store: &Store, cache: &str) -> Result<()> {
    crate::names::validate_cache(cache)?;
    if store.cache_dir(cache).is_dir() {
        Ok(())
    } else {
        Err(Error::Conflict(format!(
            "no cache named {cache:?} under {}",
            store.root().display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendKind;
    use crate::state::XattrNs;
    use std::collections::BTreeMap;

    fn session(lowers: &[&str], committing: Option<&str>) -> Session {
        Session {
            base: lowers[0].to_string(),
            lowers: lowers.iter().map(|s| s.to_string()).collect(),
            backend: BackendKind::Kernel,
            mounts: BTreeMap::new(),
            started_at: String::new(),
            pid: None,
            root_attrs: (0, 0, 0o755),
            committing: committing.map(str::to_string),
        }
    }

    #[test]
    fn reachability() {
        let mut s = CacheState::new(XattrNs::Trusted);
        s.push_layer("a", "0", "c-a");
        s.push_layer("b", "a", "c-b");
        s.push_layer("lost", "0", "c-lost");
        s.push_layer("c", "b", "c-c");
        assert_eq!(
            reachable(&s, &[]),
            ["0", "a", "b", "c"].map(String::from).into()
        );
        let live = session(&["lost", "0"], Some("promoting"));
        assert_eq!(
            reachable(&s, [&live]),
            ["0", "a", "b", "c", "lost", "promoting"]
                .map(String::from)
                .into()
        );
        // A loop in a corrupt state ends the walk instead of spinning.
        let l = CacheState::parse(
            br#"{"state":{"latest":"x"},"layers":{"x":{"parent":"y"},"y":{"parent":"x"}}}"#,
        )
        .unwrap();
        assert_eq!(reachable(&l, &[]), ["x", "y"].map(String::from).into());
    }
}
