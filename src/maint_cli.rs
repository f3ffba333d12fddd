//! The maintenance commands `compact`, `gc` and `rm`: the same functions and locks as the
//! server's worker, so they are safe against a live server; progress on a terminal.

use anyhow::{anyhow, bail};

use crate::budget::{drop_cache, Dropped};
use crate::compact::compact_cache;
use crate::gc::{check_cache_exists, gc_cache, gc_store_leftovers};
use crate::ls::human;
use crate::progress::Progress;
use crate::store::Store;

/// `e` with its chain of causes on one line (`a: b: c`), skipping causes whose text the
/// outer message already includes.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = c.source();
    }
    out
}

fn pick(store: &Store, caches: &[String]) -> anyhow::Result<Vec<String>> {
    if caches.is_empty() {
        return Ok(store.list_caches()?);
    }
    for c in caches {
        check_cache_exists(store, c)?;
    }
    Ok(caches.to_vec())
}

/// `cachedriver compact [CACHE...]`: flattens every named cache (all when none) whose latest
/// chain is deeper than one layer, whatever `--compact-depth` says (`force`), then collects
/// the layers that frees. A failure on one cache is reported and the others still run.
pub fn compact(store: &Store, caches: &[String]) -> anyhow::Result<()> {
    let caches = pick(store, caches)?;
    let mut p = Progress::new(caches.len(), "compact");
    let mut failed = Vec::new();
    for c in &caches {
        p.start(c);
        match compact_cache(store, c, 1, true) {
            Ok(Some(r)) => p.println(&format!(
                "{c}: flattened {} layers into {} ({} entries); depth {} -> {}",
                r.flattened.len(),
                r.new_layer,
                r.entries,
                r.depth_before,
                r.depth_after
            )),
            Ok(None) => p.println(&format!("{c}: nothing to compact")),
            Err(e) => {
                failed.push(format!("{c}: compaction failed: {}", chain(&e)));
            }
        }
        match gc_cache(store, c, false) {
            Ok(g) if !g.deleted.is_empty() => p.println(&format!(
                "{c}: deleted {} layer(s), freed {}",
                g.deleted.len(),
                human(g.bytes_freed)
            )),
            Ok(_) => {}
            Err(e) => {
                failed.push(format!("{c}: gc failed: {}", chain(&e)));
            }
        }
        p.inc();
    }
    p.finish();
    if !failed.is_empty() {
        // One line per cache with its error chain, on stderr through the CLI edge.
        bail!(
            "failed on {} cache(s):\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    Ok(())
}

/// `cachedriver gc [--dry-run] [--json]`: GC of every cache, then of dropped caches' leftovers.
pub fn gc(store: &Store, dry_run: bool, json: bool) -> anyhow::Result<()> {
    let caches = store.list_caches()?;
    let mut p = Progress::new(caches.len(), if dry_run { "gc --dry-run" } else { "gc" });
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    let verb = if dry_run { "would delete" } else { "deleted" };
    let mut total = 0;
    for c in &caches {
        p.start(c);
        match gc_cache(store, c, dry_run) {
            Ok(g) => {
                total += g.bytes_freed;
                if !json && (!g.deleted.is_empty() || !g.leftovers.is_empty()) {
                    p.println(&format!(
                        "{c}: {verb} {} layer(s){}{}, {}",
                        g.deleted.len(),
                        if g.deleted.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", g.deleted.join(", "))
                        },
                        if g.leftovers.is_empty() {
                            String::new()
                        } else {
                            format!(" and leftovers {}", g.leftovers.join(", "))
                        },
                        human(g.bytes_freed)
                    ));
                }
                if !json && !g.kept_for_sessions.is_empty() {
                    p.println(&format!(
                        "{c}: kept for live sessions: {}",
                        g.kept_for_sessions.join(", ")
                    ));
                }
                reports.push(g);
            }
            Err(e) => {
                failed.push(format!("{c}: gc failed: {}", chain(&e)));
            }
        }
        p.inc();
    }
    p.finish();
    let (dropped, bytes) = gc_store_leftovers(store, dry_run)?;
    total += bytes;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dry_run": dry_run, "caches": reports, "dropped_caches": dropped, "bytes_freed": total,
            }))?
        );
    } else {
        if !dropped.is_empty() {
            println!("{verb} leftovers of dropped caches: {}", dropped.join(", "));
        }
        println!(
            "{} {}",
            if dry_run { "would free" } else { "freed" },
            human(total)
        );
    }
    if !failed.is_empty() {
        bail!(
            "gc failed on {} cache(s):\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    Ok(())
}

/// `cachedriver rm CACHE`: drops one cache; refused (naming the volumes) while a session uses it.
pub fn rm(store: &Store, spec: &str) -> anyhow::Result<()> {
    let (cache, scope) = crate::scope::split(spec)?;
    let cache = cache.as_str();
    check_cache_exists(store, cache)?;
    if let Some(scope) = scope {
        return match crate::scope::drop_scope(store, cache, &scope)? {
            crate::scope::Dropped::Done => {
                let g = crate::gc::gc_cache(store, cache, false)?;
                tracing::info!(cache, scope, bytes = g.bytes_freed, "removed scope");
                println!(
                    "removed scope {scope} of cache {cache}, freed {}",
                    human(g.bytes_freed)
                );
                Ok(())
            }
            crate::scope::Dropped::InUse(v) => Err(anyhow!(
                "scope {scope:?} of cache {cache:?} is in use by volume(s) {}; stop the containers using them first",
                v.join(", ")
            )),
            crate::scope::Dropped::Missing => Err(anyhow!(
                "cache {cache:?} has no scope {scope:?} (`cachedriver ls` lists them)"
            )),
        };
    }
    match drop_cache(store, cache, None)? {
        Dropped::Done(bytes) => {
            tracing::info!(cache, bytes, "removed cache");
            println!("removed cache {cache}, freed {}", human(bytes));
            Ok(())
        }
        Dropped::InUse(v) => Err(anyhow!(
            "cache {cache:?} is in use by volume(s) {}; stop the containers using them (or `docker volume rm` them) first",
            v.join(", ")
        )),
        Dropped::UsedSince => Err(anyhow!("cache {cache:?} was used meanwhile; try again")),
    }
}
