//! `cachedriver ls`: caches (latest, layer chain, sizes) and live sessions, read from the store.

use std::fmt::Write;

use crate::error::Result;
use crate::fsutil::tree_usage;
use crate::store::Store;

fn human(bytes: u64) -> String {
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

/// Renders the listing.
pub fn render(store: &Store) -> Result<String> {
    let mut out = String::new();
    let caches = store.list_caches()?;
    let volumes = store.list_volumes()?;
    if caches.is_empty() {
        let _ = writeln!(out, "no caches under {}", store.root().display());
    }
    for c in &caches {
        match store.load_state(c) {
            Ok(Some(s)) => {
                let chain = s.latest_chain().unwrap_or_default();
                let _ = writeln!(
                    out,
                    "cache {c}: latest {} ({} layers: {})",
                    s.state.latest,
                    chain.len(),
                    chain.join(" <- ")
                );
                for l in &chain {
                    let (bytes, entries) = tree_usage(&store.layer_dir(c, l));
                    let when = s
                        .layers
                        .get(l)
                        .and_then(|i| i.committed_at.clone())
                        .unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "  layer {l:<20} {:>10} {entries:>8} entries {when}",
                        human(bytes)
                    );
                }
                let unused: Vec<&String> = s.layers.keys().filter(|k| !chain.contains(k)).collect();
                if !unused.is_empty() {
                    let _ = writeln!(
                        out,
                        "  not in latest: {}",
                        unused
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            Ok(None) => {
                let _ = writeln!(out, "cache {c}: no state yet");
            }
            Err(e) => {
                let _ = writeln!(out, "cache {c}: unreadable: {e}");
            }
        }
    }
    let _ = writeln!(out, "volumes:");
    if volumes.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for v in &volumes {
        match &v.session {
            Some(s) => {
                let (bytes, entries) = tree_usage(&store.upper_dir(&v.cache, &v.id));
                let _ = writeln!(
                    out,
                    "  {} cache={} session={} mounted ({} mounts, {} backend, base {}, upper {} in {entries} entries)",
                    v.name, v.cache, v.id, s.mount_count(), s.backend.as_str(), s.base, human(bytes)
                );
            }
            None => {
                let _ = writeln!(out, "  {} cache={} session={} idle", v.name, v.cache, v.id);
            }
        }
    }
    Ok(out)
}
