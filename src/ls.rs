//! `cachedriver ls`: per cache the latest snapshot, the depth of its chain, disk use (each inode
//! once), layer count, last use and live sessions; then the volumes. Text or `--json`.
//!
//! Read-only and lock-free: it reads the atomically written records as they are. Whatever it
//! cannot read is reported as a problem of that cache, never as an empty cache.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::fs;
use std::time::UNIX_EPOCH;

use serde::Serialize;

use crate::budget::{last_used, UsageMemo};
use crate::error::Result;
use crate::fsutil::{rfc3339, tree_usage};
use crate::names::is_valid_layer;
use crate::state::MAX_CHAIN;
use crate::store::Store;

/// Bytes in binary units, for people.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One cache in the listing.
#[derive(Debug, Clone, Serialize)]
pub struct CacheEntry {
    /// Cache name.
    pub name: String,
    /// Its latest layer, if the state could be read.
    pub latest: Option<String>,
    /// The latest chain, newest first (empty if unreadable).
    pub chain: Vec<String>,
    /// Depth of the latest chain.
    pub depth: usize,
    /// Layer dirs on disk.
    pub layers: usize,
    /// Entries in `cache-state.json`'s `layers`.
    pub state_layers: usize,
    /// Disk the layers take, each inode once.
    pub disk_bytes: u64,
    /// Last Mount or commit (RFC 3339).
    pub last_used: Option<String>,
    /// Volumes with a live session on it.
    pub sessions: Vec<String>,
    /// What is wrong with it, in words (empty when healthy).
    pub problems: Vec<String>,
    /// Its scopes other than the default one (whose latest is `latest`).
    pub scopes: Vec<ScopeEntry>,
}

/// One scope of a cache in the listing.
#[derive(Debug, Clone, Serialize)]
pub struct ScopeEntry {
    /// Scope name.
    pub name: String,
    /// Its latest layer.
    pub latest: String,
    /// Depth of its chain.
    pub depth: usize,
    /// The scope its first session started from, if it forked one.
    pub forked_from: Option<String>,
    /// When its latest last changed.
    pub updated_at: Option<String>,
    /// Disk its chain takes, each inode once (shared layers count in every scope using them).
    pub bytes: u64,
}

/// One volume in the listing.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeEntry {
    /// Volume name.
    pub name: String,
    /// Its cache.
    pub cache: String,
    /// Its session id.
    pub id: String,
    /// `mounted` or `idle`.
    pub state: &'static str,
    /// Outstanding Mount calls.
    pub mounts: u32,
    /// Backend of the live session.
    pub backend: Option<&'static str>,
    /// The session's base layer.
    pub base: Option<String>,
    /// Depth of the session's chain.
    pub depth: Option<usize>,
    /// Bytes the session wrote so far.
    pub upper_bytes: Option<u64>,
}

/// The whole listing.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// The store root.
    pub root: String,
    /// Caches by name.
    pub caches: Vec<CacheEntry>,
    /// Volumes by name.
    pub volumes: Vec<VolumeEntry>,
}

/// Reads the listing from the store.
pub fn collect(store: &Store) -> Result<Listing> {
    let volumes = store.list_volumes()?;
    let mut memo = UsageMemo::default();
    let mut caches = Vec::new();
    for c in store.list_caches()? {
        let mut e = CacheEntry {
            name: c.clone(),
            latest: None,
            chain: vec![],
            depth: 0,
            layers: 0,
            state_layers: 0,
            disk_bytes: crate::budget::cache_usage(store, &c, &mut memo),
            last_used: last_used(store, &c)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| rfc3339(d.as_secs())),
            sessions: volumes
                .iter()
                .filter(|v| v.cache == c && v.session.is_some())
                .map(|v| v.name.clone())
                .collect(),
            problems: vec![],
            scopes: vec![],
        };
        let on_disk: BTreeSet<String> = fs::read_dir(store.cache_dir(&c))
            .map(|rd| {
                rd.flatten()
                    .filter(|d| d.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .filter_map(|d| d.file_name().into_string().ok())
                    .filter(|n| is_valid_layer(n))
                    .collect()
            })
            .unwrap_or_default();
        e.layers = on_disk.len();
        match store.load_state(&c) {
            Ok(Some(s)) => {
                e.latest = Some(s.state.latest.clone());
                e.state_layers = s.layers.len();
                for (name, sc) in &s.scopes {
                    let chain = s.chain(&sc.latest).unwrap_or_default();
                    e.scopes.push(ScopeEntry {
                        name: name.clone(),
                        latest: sc.latest.clone(),
                        depth: chain.len(),
                        forked_from: sc.forked_from.clone(),
                        updated_at: sc.updated_at.clone(),
                        bytes: crate::budget::chain_usage(store, &c, &chain, &mut memo),
                    });
                }
                // Walk without the kernel's limit so a too-deep chain shows its real depth.
                let mut chain = vec![s.state.latest.clone()];
                let mut seen = BTreeSet::from([s.state.latest.clone()]);
                while let Some(p) = s
                    .layers
                    .get(chain.last().map(String::as_str).unwrap_or_default())
                    .and_then(|l| l.parent.clone())
                {
                    if !seen.insert(p.clone()) {
                        e.problems.push(format!(
                            "the latest chain loops at layer {p:?}: state is corrupt"
                        ));
                        break;
                    }
                    chain.push(p);
                }
                e.depth = chain.len();
                if e.depth > MAX_CHAIN {
                    e.problems.push(format!(
                        "the latest chain is {} layers deep, more than the kernel's {MAX_CHAIN}: new sessions cannot mount; run `cachedriver compact {c}`",
                        e.depth
                    ));
                }
                let missing: Vec<&String> =
                    chain.iter().filter(|l| !on_disk.contains(*l)).collect();
                if !missing.is_empty() {
                    e.problems.push(format!(
                        "layer(s) named by the latest chain are missing on disk: {}",
                        missing
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                e.chain = chain;
            }
            Ok(None) => {
                if e.layers > 0 {
                    e.problems
                        .push("layers on disk but no cache-state.json: nothing names them".into());
                }
            }
            Err(err) => e.problems.push(format!("cache state unreadable: {err}")),
        }
        caches.push(e);
    }
    let volumes = volumes
        .iter()
        .map(|v| {
            let s = v.session.as_ref();
            VolumeEntry {
                name: v.name.clone(),
                cache: v.cache.clone(),
                id: v.id.clone(),
                state: if s.is_some() { "mounted" } else { "idle" },
                mounts: s.map(|s| s.mount_count()).unwrap_or(0),
                backend: s.map(|s| s.backend.as_str()),
                base: s.map(|s| s.base.clone()),
                depth: s.map(|s| s.lowers.len()),
                upper_bytes: s.map(|_| tree_usage(&store.upper_dir(&v.cache, &v.id)).0),
            }
        })
        .collect();
    Ok(Listing {
        root: store.root().display().to_string(),
        caches,
        volumes,
    })
}

/// The listing as JSON.
pub fn render_json(store: &Store) -> Result<String> {
    let l = collect(store)?;
    Ok(serde_json::to_string_pretty(&l).unwrap_or_default() + "\n")
}

fn short_chain(chain: &[String]) -> String {
    if chain.len() <= 6 {
        return chain.join(" <- ");
    }
    format!(
        "{} <- ... ({} more) ... <- {}",
        chain[..3].join(" <- "),
        chain.len() - 5,
        chain[chain.len() - 2..].join(" <- ")
    )
}

/// Renders the listing as text.
pub fn render(store: &Store) -> Result<String> {
    let l = collect(store)?;
    let mut out = String::new();
    if l.caches.is_empty() {
        let _ = writeln!(out, "no caches under {}", l.root);
    }
    for c in &l.caches {
        match &c.latest {
            Some(latest) => {
                let _ = writeln!(
                    out,
                    "cache {}: latest {latest} (depth {}, {} layers on disk, {}, last used {}, {} live session(s))",
                    c.name,
                    c.depth,
                    c.layers,
                    human(c.disk_bytes),
                    c.last_used.as_deref().unwrap_or("never"),
                    c.sessions.len()
                );
                let _ = writeln!(out, "  chain: {}", short_chain(&c.chain));
            }
            None => {
                let _ = writeln!(
                    out,
                    "cache {}: no snapshot yet ({} layers on disk, {})",
                    c.name,
                    c.layers,
                    human(c.disk_bytes)
                );
            }
        }
        for sc in &c.scopes {
            let _ = writeln!(
                out,
                "  scope {}: latest {} (depth {}, {}{}, updated {})",
                sc.name,
                sc.latest,
                sc.depth,
                human(sc.bytes),
                sc.forked_from
                    .as_deref()
                    .map(|f| format!(", forked from {f}"))
                    .unwrap_or_default(),
                sc.updated_at.as_deref().unwrap_or("never")
            );
        }
        if !c.sessions.is_empty() {
            let _ = writeln!(out, "  sessions: {}", c.sessions.join(", "));
        }
        for p in &c.problems {
            let _ = writeln!(out, "  PROBLEM: {p}");
        }
    }
    let _ = writeln!(out, "volumes:");
    if l.volumes.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for v in &l.volumes {
        match v.base.as_deref() {
            Some(base) => {
                let _ = writeln!(
                    out,
                    "  {} cache={} session={} mounted ({} mounts, {} backend, base {base}, depth {}, upper {})",
                    v.name,
                    v.cache,
                    v.id,
                    v.mounts,
                    v.backend.unwrap_or("?"),
                    v.depth.unwrap_or(0),
                    human(v.upper_bytes.unwrap_or(0))
                );
            }
            None => {
                let _ = writeln!(out, "  {} cache={} session={} idle", v.name, v.cache, v.id);
            }
        }
    }
    Ok(out)
}
