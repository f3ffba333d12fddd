//! The on-disk store: layout, cache state, the volume registry, and the per-cache lock.
//!
//! ```text
//! <root>/lower/<cache>/cache-state.json   the cache's state (written atomically)
//! <root>/lower/<cache>/<layer>/            immutable layers
//! <root>/upper/<cache>/<id>/               a live session's writes
//! <root>/work/<cache>/<id>/                overlay work dir
//! <root>/merged/<cache>/<id>/              what the container sees
//! <root>/volumes/<volume>.json             the volume registry (one file per volume)
//! ```
//! Every write here is crash-safe (temp, fsync, rename, fsync dir). Names reaching this module
//! have been validated by [`crate::names`]. Every dir is root-only ([`crate::perms`]).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::BackendKind;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{atomic_write, create_dir_all_durable, fsync_dir};
use crate::names::{validate_volume, CommitMode};
use crate::state::{CacheState, XattrNs};

/// The state file's name inside `lower/<cache>/`.
pub const STATE_FILE: &str = "cache-state.json";

/// A live session of a volume: its base snapshot and who has it mounted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Session {
    /// The layer at the top of the snapshot the session started on.
    pub base: String,
    /// That snapshot's chain, newest first (the lower dirs of the mount).
    pub lowers: Vec<String>,
    /// The backend that mounted it.
    pub backend: BackendKind,
    /// Mount calls per Docker mount ID; the session ends when this is empty.
    pub mounts: BTreeMap<String, u32>,
    /// When the session started (RFC 3339).
    pub started_at: String,
    /// The FUSE server's pid, for the fuse backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Owner, group and mode given to the upper root; an upper still empty with these is unchanged.
    pub root_attrs: (u32, u32, u32),
    /// The layer name this session's upper is being promoted to, written before the rename: a
    /// commit cut short by a crash is finished (or its dir adopted) by startup recovery, and GC
    /// never deletes a dir some record names here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committing: Option<String>,
}

impl Session {
    /// Total outstanding Mount calls.
    pub fn mount_count(&self) -> u32 {
        self.mounts.values().sum()
    }
}

/// A volume in the registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeRecord {
    /// Docker's volume name.
    pub name: String,
    /// The cache it uses.
    pub cache: String,
    /// Its session id (upper dir and new layer name).
    pub id: String,
    /// The `-o` options as given.
    pub options: BTreeMap<String, String>,
    /// The volume's own commit mode, if it set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<CommitMode>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// The live session, if mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
}

/// Paths and durable records under one root.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Holds a cache's `flock`, so two plugin processes sharing a root never change one cache at once.
#[derive(Debug)]
pub struct CacheLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Holds a cache's maintenance `flock` (see [`Store::lock_maintenance`]).
#[derive(Debug)]
pub struct MaintenanceLock {
    _lock: nix::fcntl::Flock<File>,
}

/// The maintenance lock file's name inside `lower/<cache>/`.
pub const MAINTENANCE_FILE: &str = ".maintenance";

/// Opens `path` with `open` and flocks it; retries when, by the time the lock is held, `path`
/// names another inode: a cache dropped by `rm` or eviction (renamed away while we waited) must
/// not leave us holding a lock on a dead directory.
fn lock_path(path: &Path, open: impl Fn() -> Result<File>) -> Result<nix::fcntl::Flock<File>> {
    loop {
        let file = open()?;
        // Released when the guard (and with it the fd) is dropped.
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::io("locking", path, e.into()))?;
        let held = lock.metadata().ctx("inspecting locked file", path)?;
        // Follows a symlink as `open` did, so the two always name the same thing.
        match fs::metadata(path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => return Ok(lock),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("inspecting", path, e)),
        }
        tracing::debug!(path = %path.display(), "lock target was replaced while waiting; retrying");
    }
}

impl Store {
    /// Opens (creating if needed) a store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir()
                .ctx("resolving current directory", Path::new("."))?
                .join(root)
        };
        let s = Store { root };
        for d in crate::perms::TOP_DIRS {
            create_dir_all_durable(&s.root.join(d))?;
        }
        // Root-only, also for a store an earlier version made with 0755 dirs.
        crate::perms::secure_store(&s.root)?;
        Ok(s)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `lower/<cache>`.
    pub fn cache_dir(&self, cache: &str) -> PathBuf {
        self.root.join("lower").join(cache)
    }

    /// `lower/<cache>/<layer>`.
    pub fn layer_dir(&self, cache: &str, layer: &str) -> PathBuf {
        self.cache_dir(cache).join(layer)
    }

    /// `lower/<cache>/cache-state.json`.
    pub fn state_path(&self, cache: &str) -> PathBuf {
        self.cache_dir(cache).join(STATE_FILE)
    }

    /// `upper/<cache>/<id>`.
    pub fn upper_dir(&self, cache: &str, id: &str) -> PathBuf {
        self.root.join("upper").join(cache).join(id)
    }

    /// `work/<cache>/<id>`.
    pub fn work_dir(&self, cache: &str, id: &str) -> PathBuf {
        self.root.join("work").join(cache).join(id)
    }

    /// `merged/<cache>/<id>`: the Mountpoint Docker gets.
    pub fn merged_dir(&self, cache: &str, id: &str) -> PathBuf {
        self.root.join("merged").join(cache).join(id)
    }

    /// Where a FUSE session's server writes its pid.
    pub fn pid_file(&self, cache: &str, id: &str) -> PathBuf {
        self.root
            .join("work")
            .join(cache)
            .join(format!(".{id}.pid"))
    }

    fn volume_path(&self, name: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{name}.json"))
    }

    /// Takes the cache's inter-process lock (blocking), creating the cache dir if needed.
    pub fn lock_cache(&self, cache: &str) -> Result<CacheLock> {
        let dir = self.cache_dir(cache);
        lock_path(&dir, || {
            create_dir_all_durable(&dir)?;
            File::open(&dir).ctx("opening cache dir for locking", &dir)
        })
        .map(|l| CacheLock { _lock: l })
    }

    /// Takes the cache's maintenance lock (blocking): an `flock` on `lower/<cache>/.maintenance`,
    /// held for a whole compaction, GC or eviction so those never overlap, while Mount and
    /// Unmount only ever wait on the short cache lock. Lock order: maintenance, then cache.
    pub fn lock_maintenance(&self, cache: &str) -> Result<MaintenanceLock> {
        let dir = self.cache_dir(cache);
        let path = dir.join(MAINTENANCE_FILE);
        lock_path(&path, || {
            create_dir_all_durable(&dir)?;
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .ctx("opening maintenance lock", &path)
        })
        .map(|l| MaintenanceLock { _lock: l })
    }

    /// Takes the cache's lock if nobody holds it (`None` when busy), for background work that
    /// should skip a busy cache rather than wait.
    pub fn try_lock_cache(&self, cache: &str) -> Result<Option<CacheLock>> {
        let dir = self.cache_dir(cache);
        let file = File::open(&dir).ctx("opening cache dir for locking", &dir)?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(Some(CacheLock { _lock: l })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(Error::io("locking cache dir", &dir, e.into())),
        }
    }

    /// The cache's state, or `None` if it was never used.
    pub fn load_state(&self, cache: &str) -> Result<Option<CacheState>> {
        let p = self.state_path(cache);
        match fs::read(&p) {
            Ok(b) => CacheState::parse(&b)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("{}: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("reading cache state", p, e)),
        }
    }

    /// Writes the cache's state atomically.
    pub fn save_state(&self, cache: &str, state: &CacheState) -> Result<()> {
        atomic_write(&self.state_path(cache), &state.to_bytes())
    }

    /// Loads the cache's state, creating the cache with an empty layer `0` on first use.
    /// Refuses a cache whose layers use another xattr namespace than `xattr`.
    pub fn ensure_cache(&self, cache: &str, xattr: XattrNs) -> Result<CacheState> {
        if let Some(mut s) = self.load_state(cache)? {
            match s.xattr {
                Some(ns) if ns != xattr => {
                    return Err(Error::Conflict(format!(
                        "cache {cache:?} was built with {}.overlay.* markers, but this plugin can only use {}.overlay.* ones \
                         (running {} a user namespace); use a separate --root for rootless and rootful plugins",
                        ns.as_str(),
                        xattr.as_str(),
                        if xattr == XattrNs::User { "inside" } else { "outside" }
                    )))
                }
                Some(_) => {}
                None => {
                    // A seed cache: record the namespace from now on.
                    s.xattr = Some(xattr);
                    self.save_state(cache, &s)?;
                }
            }
            for l in s.latest_chain()? {
                let d = self.layer_dir(cache, &l);
                if !d.is_dir() {
                    return Err(Error::Corrupt(format!(
                        "cache {cache:?}: layer {l:?} named by {} is missing ({})",
                        STATE_FILE,
                        d.display()
                    )));
                }
            }
            return Ok(s);
        }
        let zero = self.layer_dir(cache, "0");
        if !zero.is_dir() {
            // Normally made by `lock_cache`; not every caller holds that lock's dir yet.
            create_dir_all_durable(&self.cache_dir(cache))?;
            let tmp = self.cache_dir(cache).join(".tmp-0");
            crate::fsutil::remove_tree(&tmp)?;
            fs::create_dir(&tmp).ctx("creating layer", &tmp)?;
            fs::rename(&tmp, &zero).ctx("creating layer", &zero)?;
            fsync_dir(&self.cache_dir(cache))?;
        }
        let s = CacheState::new(xattr);
        self.save_state(cache, &s)?;
        Ok(s)
    }

    /// Names of all caches (dirs under `lower/` with a valid name).
    pub fn list_caches(&self) -> Result<Vec<String>> {
        let dir = self.root.join("lower");
        let mut out: Vec<String> = fs::read_dir(&dir)
            .ctx("listing caches", &dir)?
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| crate::names::validate_cache(n).is_ok())
            .collect();
        out.sort();
        Ok(out)
    }

    /// How long ago the volume's record was last written (every Mount writes it), if it exists.
    pub fn volume_saved_ago(&self, name: &str) -> Option<std::time::Duration> {
        let m = fs::metadata(self.volume_path(name)).ok()?.modified().ok()?;
        Some(m.elapsed().unwrap_or_default())
    }

    /// A volume's record, or `None`.
    pub fn load_volume(&self, name: &str) -> Result<Option<VolumeRecord>> {
        validate_volume(name)?;
        let p = self.volume_path(name);
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("{}: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("reading volume record", p, e)),
        }
    }

    /// Writes a volume's record atomically.
    pub fn save_volume(&self, rec: &VolumeRecord) -> Result<()> {
        validate_volume(&rec.name)?;
        let mut b = serde_json::to_vec_pretty(rec)
            .map_err(|e| Error::Corrupt(format!("serialising volume {}: {e}", rec.name)))?;
        b.push(b'\n');
        atomic_write(&self.volume_path(&rec.name), &b)
    }

    /// Forgets a volume.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        validate_volume(name)?;
        let p = self.volume_path(name);
        match fs::remove_file(&p) {
            Ok(()) => fsync_dir(&self.root.join("volumes")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("removing volume record", p, e)),
        }
    }

    /// Every volume in the registry, sorted by name. Unreadable records are logged and skipped.
    pub fn list_volumes(&self) -> Result<Vec<VolumeRecord>> {
        let dir = self.root.join("volumes");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).ctx("listing volumes", &dir)?.flatten() {
            let Ok(fname) = e.file_name().into_string() else {
                continue;
            };
            let Some(name) = fname.strip_suffix(".json") else {
                continue;
            };
            if validate_volume(name).is_err() {
                continue;
            }
            match self.load_volume(name) {
                Ok(Some(v)) => out.push(v),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(volume = name, error = %e, "skipping unreadable volume record")
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
