//! The disk budget (DESIGN §6): `--max-size` caps the disk that layers take, `--max-idle` drops
//! caches nobody used for that long. Both evict whole caches, least recently used first, and
//! never one with a live session; a later session of an evicted cache starts empty, exactly like
//! a cache that never existed.
//!
//! Disk use counts each inode once (layers share inodes through hard links after compaction):
//! the sum of `st_blocks * 512` over the distinct `(dev, ino)` of every layer of every cache.
//! Layers are immutable, so a layer's inode list is walked once and memoised ([`UsageMemo`]).
//!
//! Last use is the mtime of `lower/<cache>/.used`, touched (no fsync: an approximate time after a
//! crash is fine) by every Mount and every commit.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{fsync_dir, remove_tree};
use crate::store::{Store, VolumeRecord, STATE_FILE};

/// The last-use marker's name inside `lower/<cache>/`.
pub const USED_FILE: &str = ".used";

/// What `--max-size` accepts; part of every parse error.
pub const SIZE_FORMS: &str =
    "a size in bytes with an optional binary unit: 1073741824, 512K, 40M, 10G, 1.5T \
(K, M, G, T are powers of 1024; KiB, MiB, GiB, TiB and a trailing B are accepted too)";

/// What `--max-idle` accepts; part of every parse error.
pub const DURATION_FORMS: &str =
    "a number with a unit: 30s, 90m, 12h, 7d, 2w (seconds, minutes, hours, days, weeks)";

fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    s.split_at(end)
}

fn parse_number(num: &str) -> Option<f64> {
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') {
        return None;
    }
    num.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
}

/// Parses a `--max-size` value (binary units); the error names the accepted forms.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let bad = || format!("invalid size {s:?}: expected {SIZE_FORMS}");
    let (num, unit) = split_number(s.trim());
    let v = parse_number(num).ok_or_else(bad)?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "ki" | "kib" => 10,
        "m" | "mi" | "mib" => 20,
        "g" | "gi" | "gib" => 30,
        "t" | "ti" | "tib" => 40,
        _ => return Err(bad()),
    };
    let bytes = v * (1u64 << shift) as f64;
    if bytes < 1.0 || bytes > u64::MAX as f64 || (shift == 0 && v.fract() != 0.0) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Parses a `--max-idle` value; the error names the accepted forms.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}: expected {DURATION_FORMS}");
    let (num, unit) = split_number(s.trim());
    let v = parse_number(num).ok_or_else(bad)?;
    let secs = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        "w" => 7.0 * 86400.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(v * secs).map_err(|_| bad())
}

/// Records that `cache` was used now (Mount, commit). Cheap and never fatal: a failure is logged.
pub fn mark_used(store: &Store, cache: &str) {
    let p = store.cache_dir(cache).join(USED_FILE);
    let r = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p)
        .and_then(|f| {
            let now = nix::sys::time::TimeSpec::UTIME_NOW;
            nix::sys::stat::futimens(&f, &now, &now).map_err(std::io::Error::from)
        });
    if let Err(e) = r {
        tracing::warn!(cache, error = %e, "could not record the cache's last use");
    }
}

/// When `cache` was last used: its `.used` marker, else its state file, else its dir.
pub fn last_used(store: &Store, cache: &str) -> Option<SystemTime> {
    let dir = store.cache_dir(cache);
    [dir.join(USED_FILE), dir.join(STATE_FILE), dir]
        .iter()
        .find_map(|p| fs::symlink_metadata(p).and_then(|m| m.modified()).ok())
}

/// One inode found in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inode {
    /// Device.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Allocated bytes (`st_blocks * 512`).
    pub bytes: u64,
    /// Its link count.
    pub nlink: u64,
    /// A directory (its links are not names we could find).
    pub dir: bool,
}

/// Every inode of the tree at `root` (itself included), without following symlinks or leaving
/// its filesystem. Explicit stack, one open directory at a time.
pub fn tree_inodes(root: &Path) -> Result<Vec<Inode>> {
    let m = fs::symlink_metadata(root).ctx("inspecting", root)?;
    let inode = |m: &fs::Metadata| Inode {
        dev: m.dev(),
        ino: m.ino(),
        bytes: m.blocks() * 512,
        nlink: m.nlink(),
        dir: m.is_dir(),
    };
    let mut out = vec![inode(&m)];
    if !m.is_dir() {
        return Ok(out);
    }
    let dev = m.dev();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).ctx("reading directory", &d)? {
            let e = e.ctx("reading directory", &d)?;
            let m = e.metadata().ctx("inspecting", &e.path())?;
            out.push(inode(&m));
            if m.is_dir() && m.dev() == dev {
                stack.push(e.path());
            }
        }
    }
    Ok(out)
}

/// Bytes that deleting all of `trees` frees: each inode once, and a file only when every one of
/// its links lies inside `trees` (a hard link kept elsewhere keeps the data).
pub fn freed_bytes(trees: &[PathBuf]) -> u64 {
    let mut seen: HashMap<(u64, u64), (u64, u64, u64, bool)> = HashMap::new();
    for t in trees {
        match tree_inodes(t) {
            Ok(inodes) => {
                for i in inodes {
                    seen.entry((i.dev, i.ino))
                        .or_insert((i.bytes, i.nlink, 0, i.dir))
                        .2 += 1;
                }
            }
            Err(e) => tracing::warn!(path = %t.display(), error = %e, "could not measure"),
        }
    }
    seen.values()
        .filter(|(_, nlink, links, dir)| *dir || links >= nlink)
        .map(|(b, ..)| b)
        .sum()
}

/// A layer dir's identity: its path, device, inode and ctime (a new layer reusing an inode
/// number of a deleted one has another ctime).
type LayerKey = (PathBuf, u64, u64, i64, i64);

/// Distinct inodes of one cache: `(dev, ino)` to allocated bytes.
type InodeMap = HashMap<(u64, u64), u64>;

/// Memoised inode lists of layers, keyed by the layer dir's identity (layers never change).
#[derive(Debug, Default)]
pub struct UsageMemo {
    layers: HashMap<LayerKey, Arc<Vec<Inode>>>,
}

impl UsageMemo {
    fn layer(&mut self, dir: &Path, seen: &mut BTreeSet<LayerKey>) -> Arc<Vec<Inode>> {
        let Ok(m) = fs::symlink_metadata(dir) else {
            return Arc::new(vec![]);
        };
        let key = (
            dir.to_path_buf(),
            m.dev(),
            m.ino(),
            m.ctime(),
            m.ctime_nsec(),
        );
        seen.insert(key.clone());
        if let Some(v) = self.layers.get(&key) {
            return v.clone();
        }
        let v = Arc::new(tree_inodes(dir).unwrap_or_else(|e| {
            tracing::warn!(layer = %dir.display(), error = %e, "could not measure layer");
            vec![]
        }));
        self.layers.insert(key, v.clone());
        v
    }

    /// The distinct inodes of every directory under `lower/<cache>` (layers and leftovers).
    pub fn cache_inodes(&mut self, store: &Store, cache: &str) -> InodeMap {
        let mut seen = BTreeSet::new();
        self.cache_inodes_seen(store, cache, &mut seen)
    }

    fn cache_inodes_seen(
        &mut self,
        store: &Store,
        cache: &str,
        seen: &mut BTreeSet<LayerKey>,
    ) -> InodeMap {
        let dir = store.cache_dir(cache);
        let mut out = HashMap::new();
        let Ok(rd) = fs::read_dir(&dir) else {
            return out;
        };
        for e in rd.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            for i in self.layer(&e.path(), seen).iter() {
                out.insert((i.dev, i.ino), i.bytes);
            }
        }
        out
    }
}

/// Disk that the layers of one snapshot chain take, each inode counted once (a scope's size).
pub fn chain_usage(store: &Store, cache: &str, chain: &[String], memo: &mut UsageMemo) -> u64 {
    let mut seen = BTreeSet::new();
    let mut inodes: InodeMap = HashMap::new();
    for l in chain {
        for i in memo.layer(&store.layer_dir(cache, l), &mut seen).iter() {
            inodes.insert((i.dev, i.ino), i.bytes);
        }
    }
    inodes.values().sum()
}

/// Disk that `cache`'s layers take, each inode counted once.
pub fn cache_usage(store: &Store, cache: &str, memo: &mut UsageMemo) -> u64 {
    memo.cache_inodes(store, cache).values().sum()
}

/// The budget settings; both off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// `--max-size`: cap on the disk all caches' layers take.
    pub max_size: Option<u64>,
    /// `--max-idle`: caches unused this long are evicted.
    pub max_idle: Option<Duration>,
}

/// One cache evicted by [`enforce`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// The cache.
    pub cache: String,
    /// Bytes freed.
    pub bytes: u64,
    /// Why it was evicted.
    pub why: String,
}

/// Every volume record, failing on one that cannot be read: deciding what is unused from a
/// partial list could delete a live session's layers.
pub fn volumes_strict(store: &Store) -> Result<Vec<VolumeRecord>> {
    let dir = store.root().join("volumes");
    let mut out = Vec::new();
    for e in fs::read_dir(&dir).ctx("listing volumes", &dir)? {
        let e = e.ctx("listing volumes", &dir)?;
        let Ok(fname) = e.file_name().into_string() else {
            continue;
        };
        let Some(name) = fname.strip_suffix(".json") else {
            continue;
        };
        if crate::names::validate_volume(name).is_err() {
            continue;
        }
        if let Some(v) = store.load_volume(name)? {
            out.push(v);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Names of the volumes with a live session on `cache`.
pub fn live_volumes(store: &Store, cache: &str) -> Result<Vec<String>> {
    Ok(volumes_strict(store)?
        .into_iter()
        .filter(|v| v.cache == cache && v.session.is_some())
        .map(|v| v.name)
        .collect())
}

/// What [`drop_cache`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// The cache is gone; this many bytes were freed.
    Done(u64),
    /// Refused: these volumes have live sessions on it.
    InUse(Vec<String>),
    /// Skipped: it was used after the eviction was decided.
    UsedSince,
}

/// A free name `lower/.gc-<name>[.N]` (or inside `dir`) to move garbage to before deleting it.
pub(crate) fn aside_name(dir: &Path, name: &str) -> PathBuf {
    let base = dir.join(format!(".gc-{name}"));
    if fs::symlink_metadata(&base).is_err() {
        return base;
    }
    (1u64..)
        .map(|i| dir.join(format!(".gc-{name}.{i}")))
        .find(|p| fs::symlink_metadata(p).is_err())
        .unwrap_or(base)
}

/// Moves the cache's `.orphan-*` upper dirs (writes of crashed sessions that recovery has not
/// committed yet) into `aside` to be deleted with it: dropping a cache drops all its data, and
/// nothing could commit them once the cache is gone. With no session live (checked by the
/// caller, under the locks) `upper/<cache>/` holds nothing else.
fn drop_orphan_uppers(store: &Store, cache: &str, aside: &Path) -> Result<()> {
    let up = store.root().join("upper").join(cache);
    let Ok(rd) = fs::read_dir(&up) else {
        return Ok(());
    };
    let mut moved = false;
    for e in rd {
        let e = e.ctx("listing upper dirs", &up)?;
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(".orphan-") {
            continue;
        }
        let from = e.path();
        let to = aside.join(&name);
        match fs::rename(&from, &to) {
            Ok(()) => moved = true,
            // Another filesystem: delete it in place.
            Err(err) if err.raw_os_error() == Some(libc::EXDEV) => remove_tree(&from)?,
            Err(err) => return Err(Error::io("moving an orphaned upper dir aside", &from, err)),
        }
    }
    if moved {
        fsync_dir(&up)?;
    }
    Ok(())
}

/// Drops a whole cache: under its maintenance and cache locks, refuses if a session uses it (or,
/// with `unused_since`, if it was used after that time), renames `lower/<cache>` to
/// `lower/.gc-<cache>` (one atomic step: the state and every layer go at once, so a later
/// session starts empty as on a cache that never existed), then deletes that tree. A crash
/// between the two leaves a `.gc-*` dir that the next GC removes.
pub fn drop_cache(store: &Store, cache: &str, unused_since: Option<SystemTime>) -> Result<Dropped> {
    crate::names::validate_cache(cache)?;
    let dir = store.cache_dir(cache);
    if fs::symlink_metadata(&dir).is_err() {
        return Err(Error::Conflict(format!(
            "no cache named {cache:?} under {}",
            store.root().display()
        )));
    }
    let lower = store.root().join("lower");
    let aside = {
        let _m = store.lock_maintenance(cache)?;
        let _c = store.lock_cache(cache)?;
        let users = live_volumes(store, cache)?;
        if !users.is_empty() {
            return Ok(Dropped::InUse(users));
        }
        if let (Some(t), Some(used)) = (unused_since, last_used(store, cache)) {
            if used > t {
                return Ok(Dropped::UsedSince);
            }
        }
        let aside = aside_name(&lower, cache);
        crate::failpoint!("budget::before_rename");
        fs::rename(&dir, &aside).ctx("moving cache aside for deletion", &dir)?;
        fsync_dir(&lower)?;
        drop_orphan_uppers(store, cache, &aside)?;
        // Waiters on either lock wake on the moved dir, see the path changed and retry.
        aside
    };
    crate::failpoint!("budget::before_delete");
    let bytes = freed_bytes(std::slice::from_ref(&aside));
    remove_tree(&aside)?;
    Ok(Dropped::Done(bytes))
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Applies the budget to every cache of the store: first `max_idle`, then `max_size` (LRU
/// first). Caches with a live session are never evicted. Logs each eviction.
pub fn enforce(store: &Store, policy: &Policy, memo: &mut UsageMemo) -> Result<Vec<Eviction>> {
    let mut out = Vec::new();
    if policy.max_size.is_none() && policy.max_idle.is_none() {
        return Ok(out);
    }
    let now = SystemTime::now();
    let live: BTreeSet<String> = volumes_strict(store)?
        .into_iter()
        .filter(|v| v.session.is_some())
        .map(|v| v.cache)
        .collect();
    let mut caches: Vec<(SystemTime, String)> = store
        .list_caches()?
        .into_iter()
        .map(|c| (last_used(store, &c).unwrap_or(SystemTime::UNIX_EPOCH), c))
        .collect();
    caches.sort();
    let evict = |cache: &str, why: String, out: &mut Vec<Eviction>| -> bool {
        match drop_cache(store, cache, Some(now)) {
            Ok(Dropped::Done(bytes)) => {
                tracing::info!(cache, bytes, why = %why, "evicted cache");
                out.push(Eviction {
                    cache: cache.to_string(),
                    bytes,
                    why,
                });
                true
            }
            Ok(Dropped::InUse(v)) => {
                tracing::info!(cache, volumes = ?v, "not evicting: in use");
                false
            }
            Ok(Dropped::UsedSince) => false,
            Err(e) => {
                tracing::warn!(cache, error = %e, "eviction failed");
                false
            }
        }
    };
    if let Some(idle) = policy.max_idle {
        caches.retain(|(used, c)| {
            let age = now.duration_since(*used).unwrap_or_default();
            if age <= idle || live.contains(c) {
                return true;
            }
            let why = format!(
                "unused for {} (--max-idle {})",
                human_duration(age),
                human_duration(idle)
            );
            !evict(c, why, &mut out)
        });
    }
    // Scopes go before whole caches: an idle pull request's scope is cheaper to lose than the
    // cache `main` builds from.
    if let Some(idle) = policy.max_idle {
        for (_, c) in &caches {
            for (scope, updated) in scopes_oldest_first(store, c) {
                let age = now.duration_since(updated).unwrap_or_default();
                if age > idle {
                    let why = format!(
                        "scope unused for {} (--max-idle {})",
                        human_duration(age),
                        human_duration(idle)
                    );
                    evict_scope(store, c, &scope, why, &mut out);
                }
            }
        }
    }
    let Some(max) = policy.max_size else {
        return Ok(out);
    };
    let mut scopes: Vec<(SystemTime, String, String)> = caches
        .iter()
        .flat_map(|(_, c)| {
            scopes_oldest_first(store, c)
                .into_iter()
                .map(move |(s, t)| (t, c.clone(), s))
        })
        .collect();
    scopes.sort();
    for (_, c, scope) in scopes {
        let total = store_usage(store, &caches, memo);
        if total <= max {
            break;
        }
        let why = format!(
            "disk use {} over --max-size {} (idle scopes first, least recently updated first)",
            crate::ls::human(total),
            crate::ls::human(max)
        );
        evict_scope(store, &c, &scope, why, &mut out);
    }
    // inode -> (bytes, number of caches holding it)
    let mut all: HashMap<(u64, u64), (u64, u32)> = HashMap::new();
    let mut per: Vec<(SystemTime, String, InodeMap)> = Vec::new();
    let mut seen = BTreeSet::new();
    for (used, c) in &caches {
        let inodes = memo.cache_inodes_seen(store, c, &mut seen);
        for (k, b) in &inodes {
            all.entry(*k).or_insert((*b, 0)).1 += 1;
        }
        per.push((*used, c.clone(), inodes));
    }
    memo.layers.retain(|k, _| seen.contains(k));
    let mut total: u64 = all.values().map(|(b, _)| b).sum();
    for (_, c, inodes) in &per {
        if total <= max {
            break;
        }
        if live.contains(c) {
            continue;
        }
        let why = format!(
            "disk use {} over --max-size {} (least recently used first)",
            crate::ls::human(total),
            crate::ls::human(max)
        );
        if evict(c, why, &mut out) {
            for k in inodes.keys() {
                if let Some(e) = all.get_mut(k) {
                    e.1 -= 1;
                    if e.1 == 0 {
                        total = total.saturating_sub(e.0);
                    }
                }
            }
        }
    }
    if total > max {
        tracing::warn!(
            total,
            max,
            "layers still take more than --max-size: the remaining caches are in use"
        );
    }
    Ok(out)
}

/// Disk all `caches` take together, each inode once.
fn store_usage(store: &Store, caches: &[(SystemTime, String)], memo: &mut UsageMemo) -> u64 {
    let mut all: HashMap<(u64, u64), u64> = HashMap::new();
    for (_, c) in caches {
        all.extend(memo.cache_inodes(store, c));
    }
    all.values().sum()
}

/// The non-default scopes of `cache` with when each last changed, oldest first.
fn scopes_oldest_first(store: &Store, cache: &str) -> Vec<(String, SystemTime)> {
    let Ok(Some(st)) = store.load_state(cache) else {
        return vec![];
    };
    let mut v: Vec<(String, SystemTime)> = st
        .scopes
        .iter()
        .map(|(n, s)| {
            let t = s
                .updated_at
                .as_deref()
                .and_then(crate::policy::parse_rfc3339)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (n.clone(), t)
        })
        .collect();
    v.sort_by_key(|(_, t)| *t);
    v
}

/// Drops one scope (never one with a live session) and collects what only it needed.
fn evict_scope(store: &Store, cache: &str, scope: &str, why: String, out: &mut Vec<Eviction>) {
    match crate::scope::drop_scope(store, cache, scope) {
        Ok(crate::scope::Dropped::Done) => {
            let bytes = match crate::gc::gc_cache(store, cache, false) {
                Ok(g) => g.bytes_freed,
                Err(e) => {
                    tracing::warn!(cache, scope, error = %e, "gc after dropping a scope failed");
                    0
                }
            };
            tracing::info!(cache, scope, bytes, why = %why, "evicted scope");
            out.push(Eviction {
                cache: format!("{cache}:{scope}"),
                bytes,
                why,
            });
        }
        Ok(crate::scope::Dropped::InUse(v)) => {
            tracing::info!(cache, scope, volumes = ?v, "not evicting scope: in use")
        }
        Ok(crate::scope::Dropped::Missing) => {}
        Err(e) => tracing::warn!(cache, scope, error = %e, "scope eviction failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("40M"), Ok(40 << 20));
        assert_eq!(parse_size("40m"), Ok(40 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("100B"), Ok(100));
        for bad in [
            "", "G", "10X", "-1G", "0", "0M", "1.5", ".5G", "5.G", "1e9", "10 G G", "10GB",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("40M") && e.contains("10G"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(1_209_600)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        for bad in ["", "7", "d", "7D", "7x", "-1d", "0s", "1d2h", "7 days"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("7d") && e.contains("30s"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn freed_bytes_respects_links_outside() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        fs::write(a.join("only"), vec![1u8; 64 << 10]).unwrap();
        fs::write(a.join("shared"), vec![2u8; 64 << 10]).unwrap();
        fs::hard_link(a.join("shared"), b.join("shared")).unwrap();
        let only = fs::metadata(a.join("only")).unwrap().blocks() * 512;
        let shared = fs::metadata(a.join("shared")).unwrap().blocks() * 512;
        let dir = fs::metadata(&a).unwrap().blocks() * 512;
        assert_eq!(freed_bytes(std::slice::from_ref(&a)), only + dir);
        let dirb = fs::metadata(&b).unwrap().blocks() * 512;
        assert_eq!(freed_bytes(&[a, b]), only + shared + dir + dirb);
    }
}
